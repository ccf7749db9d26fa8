//! `tern top`: the live dashboard, as a library the `tern` CLI drives.
//!
//! Data flow: the daemon's watch stream ([`feed::pump`] over a [`Backend`]) → [`App`] (state
//! machine; [`model::Tracker`] derives rates from counter deltas) → [`model::ViewModel`] → the
//! pure `render_*` functions in [`render`] → a ratatui frame. Keys go through the one table in
//! [`keys`] to an [`keys::Action`], and what needs the daemon comes back as an [`Effect`] for the
//! CLI to perform. Only the CLI touches the terminal and the socket, so everything here is
//! tested with ratatui's `TestBackend` and fixed snapshots.
//!
//! This crate does not depend on `tern`: [`snapshot`] has its own serde types for the status
//! JSON (docs/status-json.md).

pub mod app;
pub mod feed;
pub mod fmt;
pub mod keys;
pub mod model;
pub mod render;
pub mod snapshot;
pub mod why;

pub use app::{App, Conn, Effect, Feed, PingAnswer};
pub use feed::{pump, Backend, Lines};
pub use render::{frame_text, render};
pub use snapshot::Status;

/// Re-exported so the CLI drives the same versions this crate renders with.
pub use crossterm;
pub use ratatui;
