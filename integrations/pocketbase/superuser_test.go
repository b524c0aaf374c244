package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/pocketbase/pocketbase/core"
	"github.com/pocketbase/pocketbase/tests"
)

func TestSuperuserUpsertReadsThePasswordFromStdin(t *testing.T) {
	app, err := tests.NewTestApp(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer app.Cleanup()

	run := func(stdin string, args ...string) error {
		c := superuserUpsertStdinCommand(app)
		c.SetIn(strings.NewReader(stdin))
		c.SetOut(&bytes.Buffer{})
		c.SetErr(&bytes.Buffer{})
		c.SetArgs(args)
		return c.Execute()
	}
	if err := run("first-password-123\n", "admin@example.com"); err != nil {
		t.Fatal(err)
	}
	su, err := app.FindAuthRecordByEmail(core.CollectionNameSuperusers, "admin@example.com")
	if err != nil {
		t.Fatal(err)
	}
	if !su.ValidatePassword("first-password-123") {
		t.Error("the password from stdin was not set (or kept its newline)")
	}
	// Upsert: the same e-mail updates the password.
	if err := run("second-password-456", "admin@example.com"); err != nil {
		t.Fatal(err)
	}
	su, _ = app.FindAuthRecordByEmail(core.CollectionNameSuperusers, "admin@example.com")
	if !su.ValidatePassword("second-password-456") || su.ValidatePassword("first-password-123") {
		t.Error("the password was not updated")
	}
	// The password is never taken from the command line.
	if err := run("", "admin@example.com"); err == nil {
		t.Error("empty stdin accepted")
	}
	if err := run("x-password-123\n", "admin@example.com", "x-password-123"); err == nil {
		t.Error("a password argument was accepted")
	}
	if err := run("x-password-123\n", "not-an-email"); err == nil {
		t.Error("invalid e-mail accepted")
	}
}
