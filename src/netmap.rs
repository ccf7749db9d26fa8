//! Network map.
