//! What every service of the daemon shares. Its own module (below the services,
//! above the config) so that the services need not import the daemon for it.

use std::sync::Arc;

use crate::config::Settings;
use crate::domain::Role;
use crate::identity::Identity;

/// What every service of the daemon shares.
pub struct Node {
    pub settings: Settings,
    pub role: Role,
    pub identity: Identity,
    pub store: Arc<chunks::ChunkStore>,
}
