//! Integration tests against a real Keycloak. One binary, modules per concern; tests never
//! depend on order and each gets its own Gatehouse, port and store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may fail loudly

mod admin;
mod cli;
mod demo;
mod deploy;
mod ext_authz;
mod extend;
mod gateway;
mod internal;
mod login;
mod observability;
mod proxy;
mod ratelimit;
mod replicas;
mod sessions;
mod shutdown;
mod traces;
mod views;

/// The shared test kit, under the name the modules use (`crate::harness::*`).
use gatehouse_testkit as harness;

/// The `gatehouse` binary Cargo built for these tests.
pub fn bin() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_gatehouse"))
}
