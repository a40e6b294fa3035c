//! One module per subcommand.

pub mod ask;
pub mod bench_ring;
pub mod generate;
pub mod inspect;
pub mod install;
pub mod make_model;
pub mod stage;
