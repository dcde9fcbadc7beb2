//! kiln-proto: the v1 contract as Rust.
//!
//! The code under `src/generated/` is produced from `proto/` by tonic-prost-build and
//! checked in, so a normal build needs no protoc (the test `generated_code` regenerates
//! it with a vendored protoc and fails on any difference; `make proto` rewrites it).
//! [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set (with imports and comments)
//! that reflection serves and the access layer reads the `(kiln.api.v1.access)` options
//! from.

#![allow(missing_debug_implementations, unused_qualifications, clippy::all)]

/// Package `kiln.*`, nested as the proto packages are (generated code refers to its
/// neighbours by relative paths such as `super::super::build::v1`).
pub mod kiln {
    pub mod api {
        pub mod v1 {
            include!("generated/kiln.api.v1.rs");
        }
    }
    pub mod auth {
        pub mod v1 {
            include!("generated/kiln.auth.v1.rs");
        }
    }
    pub mod build {
        pub mod v1 {
            include!("generated/kiln.build.v1.rs");
        }
    }
    pub mod agent {
        pub mod v1 {
            include!("generated/kiln.agent.v1.rs");
        }
    }
}

pub use kiln::agent::v1 as agent;
pub use kiln::api::v1 as api;
pub use kiln::auth::v1 as auth;
pub use kiln::build::v1 as build;

/// Encoded `google.protobuf.FileDescriptorSet` of the whole contract and its imports.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/kiln_descriptor.bin");

/// The proto files of the contract, relative to `proto/`, in generation order.
pub const PROTO_FILES: &[&str] = &[
    "kiln/api/v1/access.proto",
    "kiln/auth/v1/auth.proto",
    "kiln/build/v1/build.proto",
    "kiln/agent/v1/agent.proto",
];
