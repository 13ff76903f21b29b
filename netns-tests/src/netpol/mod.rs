//! The Kubernetes e2e NetworkPolicy suite on namespace clusters: the reachability model
//! (`reachability`), upstream's cases as data (`cases`), and the world that runs them
//! (`world`: three nodes, namespaces x, y, z with pods a, b, c, a probe agent in each pod).

pub mod cases;
pub mod reachability;
pub mod world;
