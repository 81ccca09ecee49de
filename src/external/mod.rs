//! The second front door: nix-lazy-builder as a Nix `external-builders` program (Nix ≥ 2.32).
//!
//! nix-daemon runs `nix-lazy-builder external-build BUILD_JSON` as the build user. That client
//! (`client.rs`) holds no key and reaches no root socket: it asks the supervisor over the build
//! socket (`door.rs`, which only root and the build-users group may use) to run the build. The
//! supervisor starts one root helper per build (`serve.rs`, `external-serve`), which chooses and
//! boots the builder, copies the inputs, builds the derivation made from build.json
//! (`job.rs`) and streams the outputs back; the client unpacks them into the scratch paths.
//!
//! What the two ends of the build socket say to each other is `proto.rs`. This file only names
//! the rooms; it must never hold code.

pub mod client;
pub mod door;
pub mod job;
pub mod proto;
pub mod serve;

pub use proto::build_socket_path;
