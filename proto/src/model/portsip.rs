//! PortSIP's fixed numbers: the service users inside its images, its ports
//! and the paths `im.sh` uses. The agent knows none of these beyond what a
//! spec tells it; the controller builds specs and judges hosts with them.

/// Name of the IM deployment on every host (labels its containers).
pub const DEPLOYMENT_NAME: &str = "portsip-im";
pub const DEFAULT_IMAGE: &str = "portsip/pbx:22";
pub const DEFAULT_DB_IMAGE: &str = "portsip/postgresql:14.12";
/// Default data path of `im.sh`.
pub const DEFAULT_DATA_PATH: &str = "/var/lib/portsip";

/// PortSIP's service user and group inside the IM containers.
pub const SERVICE_UID: u32 = 888;
pub const SERVICE_GID: u32 = 888;
/// The database image's `postgres` user.
pub const POSTGRES_UID: u32 = 999;

/// TCP port IM clients connect to; the only one PortSIP opens to the outside.
pub const IM_CLIENT_PORT: u32 = 8887;
/// The IM's local health and statistics port.
pub const IM_STATS_PORT: u32 = 8902;
pub const DATABASE_PORT: u32 = 5432;

/// Where the IM data directory is mounted inside the PortSIP containers.
pub const IM_DATA_MOUNT: &str = "/var/lib/portsip/pbx";
/// Where `-f` storage is mounted: inside the data mount.
pub const IM_STORAGE_MOUNT: &str = "/var/lib/portsip/pbx/im/storage";

/// Secret ids referenced as `${secret:ID}` in the spec.
pub const SECRET_DB_PASSWORD: &str = "db_superuser_password";
pub const SECRET_IM_TOKEN: &str = "im_token";
