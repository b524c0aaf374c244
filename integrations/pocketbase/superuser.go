package main

import (
	"bufio"
	"errors"
	"fmt"
	"strings"

	"github.com/pocketbase/ozzo-validation/v4/is"
	"github.com/pocketbase/pocketbase/core"
	"github.com/spf13/cobra"
)

// maxPasswordLen bounds what is read from stdin; PocketBase's own limit is far lower.
const maxPasswordLen = 1024

// superuserUpsertStdinCommand is `superuser upsert-stdin EMAIL`: PocketBase's `superuser upsert
// EMAIL PASSWORD` with the password read from the first line of standard input instead of the
// command line, where every local user can read it (ps, /proc/PID/cmdline) and shells keep it in
// their history.
func superuserUpsertStdinCommand(app core.App) *cobra.Command {
	return &cobra.Command{
		Use:          "upsert-stdin EMAIL",
		Example:      "superuser upsert-stdin admin@example.com < password-file",
		Short:        "Creates, or updates if the email exists, a superuser; the password is read from stdin",
		Args:         cobra.ExactArgs(1),
		SilenceUsage: true,
		RunE: func(command *cobra.Command, args []string) error {
			email := args[0]
			if is.EmailFormat.Validate(email) != nil {
				return errors.New("missing or invalid email address")
			}
			password, err := readPassword(command)
			if err != nil {
				return err
			}
			col, err := app.FindCachedCollectionByNameOrId(core.CollectionNameSuperusers)
			if err != nil {
				return fmt.Errorf("failed to fetch %q collection: %w", core.CollectionNameSuperusers, err)
			}
			su, err := app.FindAuthRecordByEmail(col, email)
			if err != nil {
				su = core.NewRecord(col)
			}
			su.SetEmail(email)
			su.SetPassword(password)
			if err := app.Save(su); err != nil {
				return fmt.Errorf("failed to upsert superuser account: %w", err)
			}
			fmt.Fprintf(command.OutOrStdout(), "Successfully saved superuser %q!\n", su.Email())
			return nil
		},
	}
}

// readPassword reads the first line of stdin (without its line ending).
func readPassword(command *cobra.Command) (string, error) {
	r := bufio.NewReaderSize(command.InOrStdin(), maxPasswordLen+2)
	line, err := r.ReadString('\n')
	if err != nil && line == "" {
		return "", errors.New("no password on standard input")
	}
	if len(line) > maxPasswordLen+1 {
		return "", fmt.Errorf("the password is longer than %d bytes", maxPasswordLen)
	}
	password := strings.TrimRight(line, "\r\n")
	if password == "" {
		return "", errors.New("empty password on standard input")
	}
	return password, nil
}
