//! The serving path between the SQL surfaces and the access method: the search of an index
//! over its table's partitions and shards (`search`, `fanout`), the item-to-item channels'
//! neighbour tables (`neighbors`), saved pipelines (`pipelines`), the funnel core's sources over
//! SPI (`sources`) and the hot-item cache (`item_cache`).

pub mod fanout;
pub mod item_cache;
pub mod neighbors;
pub mod pipelines;
pub mod search;
pub mod sources;
