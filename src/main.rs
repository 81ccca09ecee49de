//! The command line: parses arguments and hands over to the library. Nothing else lives here.

fn main() {}
