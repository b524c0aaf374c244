package gatehouseauth

import (
	"context"
	"log/slog"
	"os"

	"github.com/pocketbase/pocketbase/core"
)

// consoleLog mirrors warnings and errors to stderr. PocketBase's own logger writes only to its
// logs database outside dev mode, and an operator starting the service needs to see "Gatehouse
// refused our certificate" in the console, not only in the dashboard.
var consoleLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

// logf logs to PocketBase's logger (its dashboard's Logs) and, from Warn up, to stderr. Callers
// pass only secret-free attributes: a session appears as its 8-hex hash prefix, never raw, and
// tokens never. app may be nil (before Register): then only the console gets the line.
func logf(app core.App, level slog.Level, msg string, args ...any) {
	ctx := context.Background()
	if app != nil {
		app.Logger().Log(ctx, level, msg, args...)
	}
	// In dev mode PocketBase already prints its log to the console.
	if level >= slog.LevelWarn && (app == nil || !app.IsDev()) {
		consoleLog.Log(ctx, level, msg, args...)
	}
}
