//! placeholder until the Wycheproof tests land
