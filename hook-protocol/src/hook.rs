//! TODO(hook): being written.
