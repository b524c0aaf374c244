// Command gatehouse-pocketbase is PocketBase with Gatehouse session authentication built in.
//
// It is started like PocketBase itself (`serve --http 127.0.0.1:8090 --dir DATA`); the
// GATEHOUSE_* environment variables configure the integration (see README.md).
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/pocketbase/pocketbase"
	"github.com/pocketbase/pocketbase/cmd"
	"github.com/pocketbase/pocketbase/core"
	"github.com/pocketbase/pocketbase/plugins/migratecmd"

	"gatehouse.local/integrations/pocketbase/gatehouseauth"
	_ "gatehouse.local/integrations/pocketbase/migrations"
)

func main() {
	// Not pocketbase.New(): it guesses "go run" from the executable living under the user cache
	// directory, where scripts/pocketbase.sh puts the binary, and would switch on dev mode (every
	// SQL statement logged). `--dev` still turns it on explicitly.
	app := pocketbase.NewWithConfig(pocketbase.Config{DefaultDev: false})

	// Registered here rather than by app.Start() so that we can tell which command will run:
	// only `serve` needs the Gatehouse configuration; `superuser` and `migrate` must work without
	// it (e.g. to create the first superuser before the certificates exist).
	serveCmd := cmd.NewServeCommand(app, true)
	superuserCmd := cmd.NewSuperuserCommand(app)
	superuserCmd.AddCommand(superuserUpsertStdinCommand(app))
	app.RootCmd.AddCommand(superuserCmd, serveCmd)
	// `migrate` gives operators up/down/history for the Go migrations; Automigrate is off because
	// the schema lives in Go code, not in the admin UI.
	migratecmd.MustRegister(app, app.RootCmd, migratecmd.Config{Automigrate: false})

	if target, _, err := app.RootCmd.Find(os.Args[1:]); err == nil && target == serveCmd && !wantsHelp(os.Args[1:]) {
		cfg, err := gatehouseauth.ConfigFromEnv()
		if err == nil {
			var gh *gatehouseauth.Gatehouse
			if gh, err = gatehouseauth.New(cfg); err == nil {
				gh.Register(app)
				eff := gh.Config()
				log.Printf("gatehouse: sessions exchanged at %s, tokens checked against %s (issuer %s), cache <= %s",
					eff.ExchangeURL, eff.JWKSURL, eff.Issuer, eff.CacheMaxAge)
			}
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "gatehouse-pocketbase: invalid Gatehouse configuration:\n%v\n", err)
			os.Exit(2)
		}
	}

	// OpenTelemetry (OTEL_EXPORTER_OTLP_* environment); spans are flushed when PocketBase stops.
	shutdownTracing, err := gatehouseauth.SetupTracing(context.Background())
	if err != nil {
		fmt.Fprintf(os.Stderr, "gatehouse-pocketbase: tracing: %v\n", err)
		os.Exit(2)
	}
	app.OnTerminate().BindFunc(func(e *core.TerminateEvent) error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdownTracing(ctx)
		return e.Next()
	})

	if err := app.Execute(); err != nil {
		log.Fatal(err)
	}
}

// wantsHelp reports whether the command line asks for help, which needs no configuration.
func wantsHelp(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		if a == "-h" || a == "--help" {
			return true
		}
	}
	return false
}
