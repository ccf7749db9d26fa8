//! Network-namespace lab: topologies, NAT boxes and the processes run inside them.

pub mod caddy;
pub mod control;
pub mod detached;
pub mod error;
pub mod nat;
pub mod netns;
pub mod process;
pub mod state;
pub mod topology;
pub mod wan;
pub mod whoami;

pub use caddy::{CaddyConfig, CaddyNode};
pub use error::{LabError, Result};
pub use nat::NatMode;
pub use netns::Netns;
pub use process::Process;
pub use topology::Topology;
pub use whoami::{spawn_whoami, WhoamiServer};
