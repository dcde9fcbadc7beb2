#![allow(dead_code)]
pub mod fake_auth;
pub mod rig;
