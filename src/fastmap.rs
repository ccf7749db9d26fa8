//! Hash maps on the packet path. Every packet looks up its peer by node key, address, route
//! prefix or id a few times; SipHash (std's default) cost about 1.5 % of a bulk transfer's CPU
//! there. These maps use foldhash, which is several times faster for such small keys and still
//! seeded per process. Their keys come from control (node keys, prefixes), from our own code (peer
//! ids) or from disco-verified paths, never straight from an unauthenticated packet.

/// A `HashMap` with foldhash's seeded fast hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
