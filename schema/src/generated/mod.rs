pub mod sluice_generated;
