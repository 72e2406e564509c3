//! The deploy step.
pub mod config;
