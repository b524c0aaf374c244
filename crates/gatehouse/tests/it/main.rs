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
mod harness;
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
