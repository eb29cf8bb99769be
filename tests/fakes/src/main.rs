//! `portsip-fake`: one static binary that behaves like the programs inside
//! PortSIP's images, chosen by the name it is invoked as. Same arguments,
//! same ports, same health endpoint; no PortSIP code.
//!
//! - `im serve -E -D <dir> -t <token> -a <pbx ip> -x <private ip> -z <public ip>`:
//!   refuses an empty or malformed token, waits for the database on 5432,
//!   serves clients on 8887 and `GET /svr_stats` on 8902, writes to its data dir.
//!   `FAKE_IM_HEALTH=never` makes `/svr_stats` answer 503 forever.
//! - `initdt.sh -D <dir> --pg-superuser-name <n> --pg-superuser-password <pw>`
//! - `run_im_websrv.sh websrv serve -n websrv -D <dir>`
//! - `postgres`: listens on 5432; needs `POSTGRES_PASSWORD_FILE`.
//! - `pg_isready [-h host] [-p port]`, `curl -fsS <url>`: health-check helpers.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// As PID 1 of a container a process gets no default signal handling, so
/// exit on SIGTERM/SIGINT explicitly, as the real programs do.
fn exit_on_termination() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                std::process::exit(0);
            }
        });
    }
}

fn main() -> ExitCode {
    exit_on_termination();
    let args: Vec<String> = std::env::args().collect();
    let name = Path::new(&args[0])
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    // `portsip-fake <program> args...` works too, for local testing.
    let (program, rest) = if name == "portsip-fake" && args.len() > 1 {
        (args[1].clone(), args[2..].to_vec())
    } else {
        (name, args[1..].to_vec())
    };
    let result = match program.as_str() {
        "im" => im(&rest),
        "initdt.sh" => initdt(&rest),
        "run_im_websrv.sh" => websrv(&rest),
        "postgres" => postgres(),
        "pg_isready" => pg_isready(&rest),
        "curl" => curl(&rest),
        other => Err(format!("portsip-fake: unknown program {other}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{program}: {message}");
            ExitCode::from(2)
        }
    }
}

/// Value following `flag` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn required<'a>(args: &'a [String], name: &str) -> Result<&'a str, String> {
    flag(args, name).ok_or_else(|| format!("missing {name}"))
}

fn ip(args: &[String], name: &str) -> Result<IpAddr, String> {
    let v = required(args, name)?;
    v.parse()
        .map_err(|_| format!("{name} {v}: not an IP address"))
}

fn wait_for_port(port: u16, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("nothing answers on 127.0.0.1:{port}"))
}

fn im(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) != Some("serve") {
        return Err(
            "usage: im serve -E -D <dir> -t <token> -a <pbx> -x <private> -z <public>".into(),
        );
    }
    let dir = PathBuf::from(required(args, "-D")?);
    let token = flag(args, "-t").unwrap_or_default();
    if token.is_empty() {
        return Err("empty IM token (-t); generate one on the PBX".into());
    }
    if token.len() < 16
        || !token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err("malformed IM token (-t)".into());
    }
    let pbx = ip(args, "-a")?;
    let private = ip(args, "-x")?;
    let public = ip(args, "-z")?;
    wait_for_port(5432, Duration::from_secs(60))?;
    let im_dir = dir.join("im");
    std::fs::create_dir_all(&im_dir).map_err(|e| format!("{}: {e}", im_dir.display()))?;
    std::fs::write(
        im_dir.join("fake-im.state"),
        format!(
            "pbx={pbx}\nprivate={private}\npublic={public}\nextended={}\n",
            args.iter().any(|a| a == "-E")
        ),
    )
    .map_err(|e| format!("write to data dir: {e}"))?;
    let healthy = std::env::var("FAKE_IM_HEALTH").as_deref() != Ok("never");
    let clients = TcpListener::bind(("0.0.0.0", 8887)).map_err(|e| format!("bind 8887: {e}"))?;
    let stats = TcpListener::bind(("0.0.0.0", 8902)).map_err(|e| format!("bind 8902: {e}"))?;
    eprintln!("im: serving clients on 8887, stats on 8902 (pbx {pbx})");
    std::thread::spawn(move || {
        for stream in clients.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(b"PORTSIP-IM-FAKE\r\n");
        }
    });
    let started = Instant::now();
    for stream in stats.incoming().flatten() {
        let _ = serve_stats(stream, healthy, started);
    }
    Ok(())
}

fn serve_stats(mut stream: TcpStream, healthy: bool, started: Instant) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Read the rest of the request head so closing never resets the client.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let (status, body) = if !line.starts_with("GET /svr_stats") {
        ("404 Not Found", String::from("{}"))
    } else if healthy {
        (
            "200 OK",
            format!(
                "{{\"status\":\"ok\",\"online_users\":0,\"uptime\":{}}}",
                started.elapsed().as_secs()
            ),
        )
    } else {
        (
            "503 Service Unavailable",
            String::from("{\"status\":\"starting\"}"),
        )
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn initdt(args: &[String]) -> Result<(), String> {
    let dir = PathBuf::from(required(args, "-D")?);
    let user = required(args, "--pg-superuser-name")?;
    let password = required(args, "--pg-superuser-password")?;
    if user.is_empty() || password.len() < 8 {
        return Err("superuser name or password missing".into());
    }
    wait_for_port(5432, Duration::from_secs(60))?;
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("VERSION"), "22.0.0-fake\n")
        .map_err(|e| format!("write VERSION: {e}"))?;
    eprintln!("initdt: database initialised for {}", dir.display());
    Ok(())
}

fn websrv(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) != Some("websrv") {
        return Err("usage: run_im_websrv.sh websrv serve -n websrv -D <dir>".into());
    }
    let dir = PathBuf::from(required(args, "-D")?);
    std::fs::write(dir.join("im").join("fake-websrv.state"), "running\n")
        .map_err(|e| format!("write to data dir: {e}"))?;
    eprintln!("websrv: running");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn postgres() -> Result<(), String> {
    let secret = std::env::var("POSTGRES_PASSWORD_FILE")
        .map_err(|_| "POSTGRES_PASSWORD_FILE is not set".to_string())?;
    let password = std::fs::read_to_string(&secret).map_err(|e| format!("{secret}: {e}"))?;
    if password.trim().len() < 8 {
        return Err("superuser password too short".into());
    }
    let data = std::env::var("PGDATA").unwrap_or_else(|_| "/var/lib/postgresql/data".into());
    std::fs::create_dir_all(&data).map_err(|e| format!("create {data}: {e}"))?;
    std::fs::write(Path::new(&data).join("PG_VERSION"), "14\n")
        .map_err(|e| format!("write {data}: {e}"))?;
    let listener = TcpListener::bind(("0.0.0.0", 5432)).map_err(|e| format!("bind 5432: {e}"))?;
    eprintln!("postgres: ready to accept connections on 5432");
    for stream in listener.incoming().flatten() {
        drop(stream);
    }
    Ok(())
}

fn pg_isready(args: &[String]) -> Result<(), String> {
    let host = flag(args, "-h").unwrap_or("127.0.0.1");
    let port: u16 = flag(args, "-p")
        .unwrap_or("5432")
        .parse()
        .map_err(|_| "bad port".to_string())?;
    TcpStream::connect((host, port))
        .map(|_| println!("{host}:{port} - accepting connections"))
        .map_err(|_| format!("{host}:{port} - no response"))
}

fn curl(args: &[String]) -> Result<(), String> {
    let url = args
        .iter()
        .rfind(|a| a.starts_with("http://"))
        .ok_or("no http:// URL")?;
    let rest = url.trim_start_matches("http://");
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let authority = authority.replace("localhost", "127.0.0.1");
    let mut stream =
        TcpStream::connect(&authority).map_err(|e| format!("connect {authority}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let ok = response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200");
    if ok {
        if let Some((_, body)) = response.split_once("\r\n\r\n") {
            println!("{body}");
        }
        Ok(())
    } else {
        Err(format!(
            "HTTP {}",
            response.lines().next().unwrap_or_default()
        ))
    }
}
