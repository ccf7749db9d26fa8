//! `tern top`: the dashboard (view state and pure render functions). Filled in by its issue.
