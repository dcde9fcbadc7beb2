//! The access policy: which standing each RPC asks for, read from the `(kiln.api.v1.access)`
//! method option in the encoded descriptor set at start-up.
//!
//! Deny by default: an RPC of a kiln service without the option can never be called, and
//! a path that is neither a kiln RPC served here nor gRPC infrastructure (health,
//! reflection) is refused before it reaches a handler.

use std::collections::HashMap;
use std::fmt;

use prost::Message;

/// The access level of an RPC, as declared in `kiln/api/v1/access.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Public,
    Viewer,
    User,
    Admin,
    Service,
}

impl Access {
    /// Maps the proto enum number; `None` for ACCESS_UNSPECIFIED and unknown values.
    fn from_proto(value: i32) -> Option<Self> {
        match value {
            1 => Some(Self::Public),
            2 => Some(Self::Viewer),
            3 => Some(Self::User),
            4 => Some(Self::Admin),
            5 => Some(Self::Service),
            _ => None,
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "PUBLIC",
            Self::Viewer => "VIEWER",
            Self::User => "USER",
            Self::Admin => "ADMIN",
            Self::Service => "SERVICE",
        })
    }
}

/// What the policy says about one request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A kiln RPC with a declared access level.
    Rpc(Access),
    /// gRPC health or reflection: open to anyone, like a load balancer's probe.
    Infrastructure,
    /// A kiln RPC without an access option: refused.
    Undeclared,
    /// Not an RPC this server serves.
    Unknown,
}

/// One RPC found in the descriptor set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcEntry {
    /// `/package.Service/Method`, the HTTP/2 path of the call.
    pub path: String,
    /// The declared access, `None` when the option is missing or unspecified.
    pub access: Option<Access>,
}

/// Path prefixes of the gRPC infrastructure services every kiln listener serves.
const INFRASTRUCTURE: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Access levels of the RPCs served by one listener.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    by_path: HashMap<String, Option<Access>>,
}

/// Errors reading the descriptor set (only a corrupt build can cause one).
#[derive(Debug, thiserror::Error)]
#[error("the embedded descriptor set cannot be decoded: {0}")]
pub struct DescriptorError(#[from] prost::DecodeError);

impl AccessPolicy {
    /// Reads every RPC of every service in `descriptor_set` (an encoded
    /// `google.protobuf.FileDescriptorSet`), keeping those of the services named in
    /// `served` (full names such as `kiln.auth.v1.AuthService`).
    pub fn from_descriptor_set(
        descriptor_set: &[u8],
        served: &[&str],
    ) -> Result<Self, DescriptorError> {
        let by_path = list_rpcs(descriptor_set)?
            .into_iter()
            .filter(|rpc| {
                served
                    .iter()
                    .any(|service| rpc.path.starts_with(&format!("/{service}/")))
            })
            .map(|rpc| (rpc.path, rpc.access))
            .collect();
        Ok(Self { by_path })
    }

    /// The paths of the RPCs this policy knows (declared or not).
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.by_path.keys().map(String::as_str)
    }

    /// Decides what to do with a request for `path`.
    pub fn verdict(&self, path: &str) -> Verdict {
        match self.by_path.get(path) {
            Some(Some(access)) => Verdict::Rpc(*access),
            Some(None) => Verdict::Undeclared,
            None if INFRASTRUCTURE.iter().any(|prefix| path.starts_with(prefix)) => {
                Verdict::Infrastructure
            }
            None => Verdict::Unknown,
        }
    }
}

/// Every RPC in an encoded descriptor set with its declared access.
pub fn list_rpcs(descriptor_set: &[u8]) -> Result<Vec<RpcEntry>, DescriptorError> {
    let set = FileDescriptorSet::decode(descriptor_set)?;
    let mut rpcs = Vec::new();
    for file in set.file {
        for service in file.service {
            let full_service = if file.package.is_empty() {
                service.name.clone()
            } else {
                format!("{}.{}", file.package, service.name)
            };
            for method in service.method {
                rpcs.push(RpcEntry {
                    path: format!("/{full_service}/{}", method.name),
                    access: method
                        .options
                        .and_then(|o| o.access)
                        .and_then(Access::from_proto),
                });
            }
        }
    }
    Ok(rpcs)
}

// Minimal mirrors of descriptor.proto: just the fields the policy needs. prost's own
// `MethodOptions` drops unknown fields, and so would lose our extension; decoding into
// these mirrors keeps field 50001 and skips everything else.

#[derive(Clone, PartialEq, Message)]
struct FileDescriptorSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<FileDescriptor>,
}

#[derive(Clone, PartialEq, Message)]
struct FileDescriptor {
    #[prost(string, tag = "2")]
    package: String,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptor>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceDescriptor {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, repeated, tag = "2")]
    method: Vec<MethodDescriptor>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodDescriptor {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "4")]
    options: Option<MethodOptions>,
}

#[derive(Clone, PartialEq, Message)]
struct MethodOptions {
    /// `(kiln.api.v1.access)`, see access.proto.
    #[prost(int32, optional, tag = "50001")]
    access: Option<i32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(name: &str, access: Option<i32>) -> MethodDescriptor {
        MethodDescriptor {
            name: name.into(),
            options: Some(MethodOptions { access }),
        }
    }

    fn encoded(methods: Vec<MethodDescriptor>) -> Vec<u8> {
        FileDescriptorSet {
            file: vec![FileDescriptor {
                package: "demo.v1".into(),
                service: vec![ServiceDescriptor {
                    name: "DemoService".into(),
                    method: methods,
                }],
            }],
        }
        .encode_to_vec()
    }

    #[test]
    fn undeclared_and_unspecified_rpcs_are_denied() {
        let set = encoded(vec![
            method("Open", Some(1)),
            method("Admin", Some(4)),
            method("Forgotten", None),
            method("Unspecified", Some(0)),
        ]);
        let policy =
            AccessPolicy::from_descriptor_set(&set, &["demo.v1.DemoService"]).expect("decodes");
        assert_eq!(
            policy.verdict("/demo.v1.DemoService/Open"),
            Verdict::Rpc(Access::Public)
        );
        assert_eq!(
            policy.verdict("/demo.v1.DemoService/Admin"),
            Verdict::Rpc(Access::Admin)
        );
        assert_eq!(
            policy.verdict("/demo.v1.DemoService/Forgotten"),
            Verdict::Undeclared
        );
        assert_eq!(
            policy.verdict("/demo.v1.DemoService/Unspecified"),
            Verdict::Undeclared
        );
        assert_eq!(
            policy.verdict("/demo.v1.DemoService/Missing"),
            Verdict::Unknown
        );
        assert_eq!(
            policy.verdict("/grpc.health.v1.Health/Check"),
            Verdict::Infrastructure
        );
    }

    #[test]
    fn services_not_served_here_are_unknown() {
        let set = encoded(vec![method("Open", Some(1))]);
        let policy =
            AccessPolicy::from_descriptor_set(&set, &["other.v1.OtherService"]).expect("decodes");
        assert_eq!(
            policy.verdict("/demo.v1.DemoService/Open"),
            Verdict::Unknown
        );
    }

    #[test]
    fn every_rpc_of_the_kiln_contract_declares_its_access() {
        let rpcs = list_rpcs(kiln_proto::FILE_DESCRIPTOR_SET).expect("decodes");
        let kiln: Vec<_> = rpcs
            .iter()
            .filter(|r| r.path.starts_with("/kiln."))
            .collect();
        assert!(
            kiln.len() >= 30,
            "expected the whole v1 contract, found {} RPCs",
            kiln.len()
        );
        let missing: Vec<&str> = kiln
            .iter()
            .filter(|r| r.access.is_none())
            .map(|r| r.path.as_str())
            .collect();
        assert!(
            missing.is_empty(),
            "RPCs without a (kiln.api.v1.access) option: {missing:#?}"
        );
    }
}
