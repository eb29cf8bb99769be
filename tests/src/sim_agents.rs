//! Many simulated agents in one process, for the daemon's benchmark and its
//! hostile-agent tests: each on its own loopback address with its own
//! genuine certificate from the controller's CA, speaking the real protocol
//! over mutual TLS (the agent's own listener code), answering Ping and
//! WatchHealth. A healthy one sends a fixed, realistic sample and costs next
//! to nothing, so what is measured is the daemon; the others send what
//! root on an IM host could make its agent send ([`Behaviour`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use imfleet_agent::identity::ServingIdentity;
use imfleet_certs::CertificateAuthority;
use imfleet_controller::store::{HostRecord, Store};
use imfleet_proto::agent::v1::agent_server::AgentServer;
use imfleet_proto::agent::v1::*;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

pub const PORT: u16 = 17_500;

/// The address of simulated agent `i` (127.78.x.y).
pub fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 78, (i / 250) as u8, (i % 250) as u8 + 1)
}

/// How a simulated agent behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Healthy,
    /// The IM unhealthy in every other sample: an event each time.
    Flapping,
    /// Samples as fast as the connection takes them.
    Flood,
    /// Samples of about 970 KB, over the daemon's decode limit.
    Oversized,
    /// Samples under the decode limit with every list far over its cap,
    /// duplicates and names no agent makes.
    Bloated,
    /// Terminal escape sequences, newlines and bidirectional overrides in
    /// every text, and an unhealthy IM to put them in events.
    Escapes,
    /// NaN and infinities for every number that can hold one.
    NonFinite,
    /// A certificate expiry a century away (the real one is 90 days).
    ClaimsExpiry,
    /// One sample per stream, then the stream ends: a new one each time.
    Restarter,
    /// Two samples every 0.76 of the interval.
    DoubleRate,
    /// A 4 MB ping reply (its version) full of escape sequences.
    PingAbuse,
}

/// A started simulated agent.
#[derive(Debug, Clone)]
pub struct Simulated {
    pub name: String,
    pub address: Ipv4Addr,
    /// Expiry of the certificate it presents (Unix seconds).
    pub certificate_not_after: i64,
}

/// Starts one agent per entry of `behaviours` on `runtime` (which must
/// outlive them), recorded as hosts in `controller`'s state.
pub fn start_for(
    controller: &crate::Controller,
    runtime: &tokio::runtime::Runtime,
    behaviours: &[Behaviour],
) -> Vec<Simulated> {
    runtime.block_on(async {
        let (state, _) =
            imfleet_controller::state::ControllerState::open_or_init(controller.state.path())
                .unwrap();
        start_each(&state.ca.load().unwrap(), &state.store, behaviours).await
    })
}

/// Starts one agent per entry, agent `i` behaving as `behaviours[i]`.
pub async fn start_each(
    ca: &CertificateAuthority,
    store: &Store,
    behaviours: &[Behaviour],
) -> Vec<Simulated> {
    let mut started = Vec::new();
    for (i, behaviour) in behaviours.iter().copied().enumerate() {
        let ip = address(i).to_string();
        let issued = crate::pki::agent_identity_now(ca, &[&ip]);
        let identity = ServingIdentity {
            info: imfleet_certs::inspect_pem(&issued.cert_pem).unwrap(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
            ca_pem: ca.cert_pem().to_owned(),
        };
        let record = HostRecord {
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
        };
        let certificate = imfleet_controller::store::CertificateRecord::new(
            &identity.info,
            Some(&record.name),
            imfleet_controller::store::CertificateState::Current,
            0,
        );
        // As bootstrap would record them, without its event.
        store.upsert_host(&record).await.unwrap();
        store.record_certificate(&certificate).await.unwrap();
        let listener = tokio::net::TcpListener::bind(SocketAddr::from((address(i), PORT)))
            .await
            .unwrap();
        let credentials = imfleet_agent::serving::Credentials::new(&identity).unwrap();
        let incoming = tokio_stream::wrappers::ReceiverStream::new(
            imfleet_agent::listener::incoming(listener, credentials),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServer::new(Agent(behaviour)))
                .serve_with_incoming(incoming),
        );
        started.push(Simulated {
            name: format!("sim{i:04}"),
            address: address(i),
            certificate_not_after: identity.info.not_after.unix_timestamp(),
        });
    }
    started
}

struct Agent(Behaviour);

/// Text root on an IM host would love an operator's terminal to run.
pub const ESCAPES: &str =
    "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4K\x07\x1b[31m\nFORGED LOG LINE\r\u{202e}\u{9b}";

fn sample(sequence: u64, behaviour: Behaviour) -> HealthSample {
    let mut s = healthy_sample(sequence, behaviour == Behaviour::Flapping);
    match behaviour {
        Behaviour::Healthy
        | Behaviour::Flapping
        | Behaviour::Flood
        | Behaviour::Restarter
        | Behaviour::DoubleRate
        | Behaviour::PingAbuse => {}
        Behaviour::Oversized => {
            s.containers = (0..9_000)
                .map(|i| ContainerStatus {
                    name: format!("c{i}"),
                    image: "x".repeat(100),
                    ..Default::default()
                })
                .collect();
        }
        Behaviour::Bloated => {
            let host = s.host.as_mut().unwrap();
            host.cpus = (0..1000)
                .map(|cpu| CpuTimes {
                    cpu: cpu % 700,
                    user: 1.0,
                    ..Default::default()
                })
                .collect();
            host.networks = (0..2000)
                .map(|i| NetworkCounters {
                    device: if i % 3 == 0 {
                        format!("bad name {i}")
                    } else {
                        format!("e{}", i % 900)
                    },
                    ..Default::default()
                })
                .collect();
            s.containers = (0..500)
                .map(|i| ContainerStatus {
                    name: format!("c{}", i % 300),
                    state: "running".into(),
                    health: "healthy".into(),
                    ..Default::default()
                })
                .collect();
            let service = s.service.as_mut().unwrap();
            service.stats = (0..1000).map(|i| (format!("figure_{i}"), 1.0)).collect();
        }
        Behaviour::Escapes => {
            for c in &mut s.containers {
                c.state = format!("{ESCAPES}running");
                c.image = format!("portsip/pbx:22{ESCAPES}");
                c.health = ESCAPES.into();
            }
            s.containers.push(ContainerStatus {
                name: ESCAPES.into(),
                ..Default::default()
            });
            s.deployment_healthy = false;
            let service = s.service.as_mut().unwrap();
            service.stats_ok = false;
            service.stats_error = format!("gate{ESCAPES}");
            service.stats.insert(ESCAPES.into(), 1.0);
            s.agent.as_mut().unwrap().version = format!("0.1{ESCAPES}");
            s.notes = vec![ESCAPES.into()];
        }
        Behaviour::NonFinite => {
            let host = s.host.as_mut().unwrap();
            host.load1 = f64::NAN;
            host.load5 = f64::INFINITY;
            host.load15 = f64::NEG_INFINITY;
            for c in &mut host.cpus {
                c.user = f64::NAN;
                c.idle = f64::INFINITY;
            }
            host.disks[0].io_time_seconds = f64::NAN;
            let service = s.service.as_mut().unwrap();
            for v in service.stats.values_mut() {
                *v = f64::NAN;
            }
            s.agent.as_mut().unwrap().cpu_seconds = f64::NAN;
        }
        Behaviour::ClaimsExpiry => {
            s.agent.as_mut().unwrap().certificate_not_after =
                imfleet_controller::now_unix() + 100 * 365 * 86_400;
        }
    }
    s
}

fn healthy_sample(sequence: u64, flapping: bool) -> HealthSample {
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
        deployment_healthy: !flapping || sequence % 2 == 1,
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
impl imfleet_proto::agent::v1::agent_server::Agent for Agent {
    async fn ping(&self, r: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        let agent_version = match self.0 {
            Behaviour::Escapes => format!("0.1{ESCAPES}"),
            Behaviour::PingAbuse => format!("{ESCAPES}{}", "V".repeat(4 << 20)),
            _ => "0.0.0-sim".into(),
        };
        Ok(Response::new(PingReply {
            nonce: r.into_inner().nonce,
            agent_version,
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
        let behaviour = self.0;
        match behaviour {
            Behaviour::Flood => {
                let mut sequence = 0u64;
                return Ok(Response::new(Box::pin(futures::stream::repeat_with(
                    move || {
                        sequence += 1;
                        Ok(sample(sequence, behaviour))
                    },
                ))));
            }
            Behaviour::Restarter => {
                return Ok(Response::new(Box::pin(futures::stream::once(async move {
                    Ok(sample(1, behaviour))
                }))));
            }
            Behaviour::DoubleRate => {
                let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
                    every.mul_f64(0.76),
                ));
                let mut sequence = 0u64;
                let pairs = futures::StreamExt::flat_map(ticks, move |_| {
                    sequence += 2;
                    futures::stream::iter([
                        Ok(sample(sequence - 1, behaviour)),
                        Ok(sample(sequence, behaviour)),
                    ])
                });
                return Ok(Response::new(Box::pin(pairs)));
            }
            _ => {}
        }
        let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every));
        let mut sequence = 0u64;
        Ok(Response::new(Box::pin(ticks.map(move |_| {
            sequence += 1;
            Ok(sample(sequence, behaviour))
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
    async fn upgrade_agent(
        &self,
        _: Request<tonic::Streaming<AgentBinaryChunk>>,
    ) -> Result<Response<AgentUpgradeStarted>, Status> {
        Err(Status::unimplemented("simulated"))
    }

    async fn renew_identity(
        &self,
        _: Request<imfleet_proto::agent::v1::RenewIdentityRequest>,
    ) -> Result<Response<imfleet_proto::agent::v1::RenewIdentityReply>, Status> {
        Err(Status::unimplemented("simulated"))
    }

    async fn install_identity(
        &self,
        _: Request<imfleet_proto::agent::v1::InstallIdentityRequest>,
    ) -> Result<Response<imfleet_proto::agent::v1::IdentityInstalled>, Status> {
        Err(Status::unimplemented("simulated"))
    }

    async fn set_trusted_cas(
        &self,
        _: Request<imfleet_proto::agent::v1::SetTrustedCasRequest>,
    ) -> Result<Response<imfleet_proto::agent::v1::TrustedCas>, Status> {
        Err(Status::unimplemented("simulated"))
    }
    async fn prepare_images(
        &self,
        _: Request<imfleet_proto::agent::v1::PrepareImagesRequest>,
    ) -> Result<Response<imfleet_proto::agent::v1::PreparedImages>, Status> {
        Err(Status::unimplemented("simulated"))
    }
}
