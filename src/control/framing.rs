//! Map response framing.
