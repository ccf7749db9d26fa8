//! Peer relays: wire pieces shared by the relay server and its clients.

pub mod client;
pub mod endpoint;
pub mod geneve;
pub mod io;
pub mod manager;
pub mod server;

/// The peer capability that lets a node allocate endpoints on a relay server (checked on the
/// server, between the client's and the server's first addresses).
pub const CAP_RELAY: &str = "tailscale.com/cap/relay";

/// The peer capability control gives a client towards each node it may use as a relay server
/// (checked on the client, between the relay's and the client's first addresses).
pub const CAP_RELAY_TARGET: &str = "tailscale.com/cap/relay-target";

/// Node attribute with which control turns this node's relay *client* off: no allocations on
/// relay servers, CallMeMaybeVia from peers ignored (Go `NodeAttrDisableRelayClient`).
pub const ATTR_DISABLE_RELAY_CLIENT: &str = "disable-relay-client";

/// Node attribute with which control keeps this node's relay *server* off whatever its pref
/// (Go `NodeAttrDisableRelayServer`).
pub const ATTR_DISABLE_RELAY_SERVER: &str = "disable-relay-server";

/// Node attribute that restricts a node to TCP port 443; Go turns the relay client off with
/// it too (`NodeAttrOnlyTCP443`).
pub const ATTR_ONLY_TCP_443: &str = "only-tcp-443";

/// Whether this node may use peer relays as a client, by its own node attributes (Go
/// `onNodeViewsUpdate`): not before control described the node, nor with either attribute.
pub fn relay_client_allowed(self_node: Option<&crate::control::tailcfg::Node>) -> bool {
    self_node.is_some_and(|me| {
        !me.cap_map.contains_key(ATTR_DISABLE_RELAY_CLIENT)
            && !me.cap_map.contains_key(ATTR_ONLY_TCP_443)
    })
}

/// The least capability version of a node that understands relay allocation (Go
/// `capVerIsRelayCapable`).
pub const MIN_RELAY_CAP_VERSION: i32 = 121;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::tailcfg::Node;

    fn node_with(attrs: &[&str]) -> Node {
        let mut node = Node::default();
        for attr in attrs {
            node.cap_map.insert((*attr).to_string(), None);
        }
        node
    }

    #[test]
    fn the_relay_client_needs_a_self_node_without_the_attributes_that_turn_it_off() {
        assert!(!relay_client_allowed(None), "no self node yet");
        assert!(relay_client_allowed(Some(&node_with(&[
            "disable-captive-portal-detection"
        ]))));
        assert!(!relay_client_allowed(Some(&node_with(&[
            ATTR_DISABLE_RELAY_CLIENT
        ]))));
        assert!(!relay_client_allowed(Some(&node_with(&[
            ATTR_ONLY_TCP_443
        ]))));
    }
}
