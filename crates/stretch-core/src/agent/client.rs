//! Client of the agent protocol (used by the deploy step).
