//! Integration tests against a real Keycloak. One binary, modules per concern; tests never
//! depend on order and each gets its own Gatehouse, port and store.

mod harness;
mod login;
mod sessions;
