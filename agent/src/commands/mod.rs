//! One module per subcommand.

pub mod generate;
pub mod inspect;
pub mod make_model;
pub mod stage;
