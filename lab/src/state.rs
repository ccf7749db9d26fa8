//! The long-lived lab's state under /run/tern-lab/ and its JSON status.
