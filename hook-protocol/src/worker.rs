//! TODO(worker): being written.
