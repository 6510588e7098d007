//! cove-agent's binary: see the library's documentation.

fn main() {
    cove_agent::run();
}
