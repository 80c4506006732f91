pub mod sluice_generated;
pub mod peer_generated;
