//! ts2021 control protocol.
