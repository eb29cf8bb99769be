//! Many simulated agents in one process, for the daemon benchmark: each on
//! its own loopback address with its own certificate from the controller's
//! CA, speaking the real protocol over mutual TLS (the agent's own listener
//! code), answering Ping and WatchHealth with a fixed, realistic sample.
//! They cost next to nothing, so what is measured is the daemon.

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use imfleet_agent::identity::ServingIdentity;
use imfleet_certs::CertificateAuthority;
use imfleet_controller::store::{HostRecord, Store};
use imfleet_proto::agent::v1::agent_server::{Agent, AgentServer};
use imfleet_proto::agent::v1::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

pub const PORT: u16 = 17_500;

/// The address of simulated agent `i` (127.78.x.y).
pub fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 78, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// How the simulated IM service behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Healthy,
    /// Unhealthy in every other sample: an event for the daemon each time.
    Flapping,
}

/// Starts `count` agents with a healthy IM and records them as bootstrapped
/// hosts.
pub async fn start(ca: &CertificateAuthority, store: &Store, count: usize) {
    start_with(ca, store, count, Service::Healthy).await
}

/// [`start`] with the IM service behaving as `service`.
pub async fn start_with(ca: &CertificateAuthority, store: &Store, count: usize, service: Service) {
    let mut incoming = Vec::new();
    for i in 0..count {
        let ip = address(i).to_string();
        let issued = crate::pki::agent_identity_now(ca, &[&ip]);
        let identity = ServingIdentity {
            info: imfleet_certs::inspect_pem(&issued.cert_pem).unwrap(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            ca_pem: ca.cert_pem().to_owned(),
        };
        store
            .upsert_host(&HostRecord {
                name: format!("sim{i:04}"),
                agent_address: ip.clone(),
                agent_port: PORT,
                ssh_user: None,
                ssh_port: None,
                agent_version: "0.0.0-sim".into(),
                agent_sha256: String::new(),
                cert_serial: identity.info.serial_hex.clone(),
                cert_not_after: identity.info.not_after.unix_timestamp(),
                supervision: "simulated".into(),
                bootstrapped_at: 0,
                last_seen_at: None,
            })
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((address(i), PORT)))
            .await
            .unwrap();
        let acceptor = imfleet_agent::listener::tls_acceptor(&identity).unwrap();
        incoming.push(tokio_stream::wrappers::ReceiverStream::new(
            imfleet_agent::listener::incoming(listener, acceptor),
        ));
    }
    let all = futures::stream::select_all(incoming);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(Simulated(service)))
            .serve_with_incoming(all),
    );
}

struct Simulated(Service);

fn sample(sequence: u64, service: Service) -> HealthSample {
    let t = sequence as f64;
    HealthSample {
        sequence,
        collected_at_ms: imfleet_controller::now_unix() * 1000,
        host: Some(HostMetrics {
            cpus: (0..4)
                .map(|cpu| CpuTimes {
                    cpu,
                    user: 100.0 + t,
                    system: 50.0 + t / 2.0,
                    idle: 1000.0 + 3.0 * t,
                    ..Default::default()
                })
                .collect(),
            memory_total_bytes: 16 << 30,
            memory_available_bytes: 10 << 30,
            load1: 0.5,
            load5: 0.4,
            load15: 0.3,
            filesystems: vec![FilesystemUsage {
                role: "data".into(),
                path: "/var/lib/portsip".into(),
                mount_point: "/".into(),
                device: "/dev/sda1".into(),
                fs_type: "ext4".into(),
                size_bytes: 256 << 30,
                available_bytes: 200 << 30,
                free_bytes: 210 << 30,
            }],
            networks: vec![NetworkCounters {
                device: "eth0".into(),
                receive_bytes: 1_000_000 + sequence * 1000,
                transmit_bytes: 2_000_000 + sequence * 1000,
                ..Default::default()
            }],
            disks: vec![DiskCounters {
                device: "sda".into(),
                read_bytes: 1 << 30,
                written_bytes: 2 << 30,
                io_time_seconds: 100.0,
            }],
            ..Default::default()
        }),
        containers: [
            "portsip.database",
            "portsip.instantmessage",
            "portsip.webserver",
        ]
        .iter()
        .map(|name| ContainerStatus {
            name: (*name).into(),
            image: "portsip/pbx:22".into(),
            state: "running".into(),
            health: "healthy".into(),
            ..Default::default()
        })
        .collect(),
        deployment_healthy: service == Service::Healthy || sequence % 2 == 1,
        service: Some(ServiceProbe {
            stats_ok: true,
            stats: [
                ("online_users".to_owned(), 1200.0),
                ("uptime".to_owned(), t),
            ]
            .into(),
            tcp: vec![PortProbe {
                port: 8887,
                open: true,
            }],
            ..Default::default()
        }),
        agent: Some(AgentMetrics {
            resident_memory_bytes: 8 << 20,
            cpu_seconds: t / 100.0,
            certificate_not_after: imfleet_controller::now_unix() + 365 * 86_400,
            uptime_seconds: sequence,
            version: "0.0.0-sim".into(),
        }),
        notes: Vec::new(),
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Simulated {
    async fn ping(&self, r: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {
            nonce: r.into_inner().nonce,
            agent_version: "0.0.0-sim".into(),
            protocol_revision: imfleet_proto::PROTOCOL_REVISION,
            supervision: "simulated".into(),
            ..Default::default()
        }))
    }
    type WatchHealthStream = Boxed<HealthSample>;
    async fn watch_health(
        &self,
        r: Request<WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        let every = Duration::from_millis(u64::from(r.get_ref().interval_ms.max(1000)));
        let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every));
        let mut sequence = 0u64;
        let service = self.0;
        Ok(Response::new(Box::pin(ticks.map(move |_| {
            sequence += 1;
            Ok(sample(sequence, service))
        }))))
    }
    async fn inventory(
        &self,
        _: Request<InventoryRequest>,
    ) -> Result<Response<HostInventory>, Status> {
        Err(Status::unimplemented("simulated"))
    }
    type ApplyStream = Boxed<ApplyEvent>;
    async fn apply(&self, _: Request<ApplyRequest>) -> Result<Response<Self::ApplyStream>, Status> {
        Err(Status::unimplemented("simulated"))
    }
    async fn control(
        &self,
        _: Request<ControlRequest>,
    ) -> Result<Response<DeploymentStatus>, Status> {
        Err(Status::unimplemented("simulated"))
    }
    async fn status(
        &self,
        _: Request<StatusRequest>,
    ) -> Result<Response<DeploymentStatus>, Status> {
        Err(Status::unimplemented("simulated"))
    }
    type LogsStream = Boxed<LogLine>;
    async fn logs(&self, _: Request<LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        Err(Status::unimplemented("simulated"))
    }
    async fn load_image(
        &self,
        _: Request<tonic::Streaming<ImageChunk>>,
    ) -> Result<Response<LoadedImage>, Status> {
        Err(Status::unimplemented("simulated"))
    }
    async fn prepare_images(
        &self,
        _: Request<imfleet_proto::agent::v1::PrepareImagesRequest>,
    ) -> Result<Response<imfleet_proto::agent::v1::PreparedImages>, Status> {
        Err(Status::unimplemented("simulated"))
    }
}
