//! Network-namespace lab: topologies, NAT boxes and the processes run inside them.

pub mod control;
