//! `portsip-fake`: one static binary that behaves like the programs inside
//! PortSIP's images, chosen by the name it is invoked as. Same arguments,
//! same ports, same health endpoint; no PortSIP code. It is deliberately at
//! least as demanding as the real programs are known or likely to be:
//!
//! - `im serve -E -D <dir> -t <token> -a <pbx ip> -x <private ip> -z <public ip>`:
//!   runs only as uid 888; refuses an empty or malformed token; logs in to
//!   the database with the password from `<dir>/system.ini`; refuses to start
//!   unless it can write every directory and file under its data tree
//!   (`im/`, `im/storage`, its logs included); serves clients on 8887 and
//!   `GET /svr_stats` on 8902. Knobs (image variants set them):
//!   `FAKE_IM_HEALTH=never` (503 forever), `FAKE_IM_SIGTERM=ignore` (no
//!   handler: as PID 1 only the kill after the grace period ends it),
//!   `FAKE_IM_CRASH=start` (exits with an error at once); `FAKE_IM_VERSION`
//!   is what `/svr_stats` and `initdt.sh`'s `VERSION` file report.
//! - `initdt.sh -D <dir> --pg-superuser-name <n> --pg-superuser-password <pw>`:
//!   uid 888; logs in to the database with that password.
//! - `run_im_websrv.sh websrv serve -n websrv -D <dir>`: uid 888; takes a
//!   moment to start, then serves `GET /healthz` on 8903 for the image's own
//!   HEALTHCHECK.
//! - `postgres`: refuses to run as root; needs PGDATA owned by its uid with
//!   mode 0700 or 0750; on first start needs `POSTGRES_PASSWORD` (the `_FILE`
//!   form is not read: whether PortSIP's image does is unknown) and keeps
//!   that password, ignoring the variable afterwards as PostgreSQL does.
//!   Answers `AUTH <user> <password>` and `PING` lines on 5432.
//! - `pg_isready [-h host] [-p port]`, `curl -fsS <url>`: health-check helpers.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const PORTSIP_UID: u32 = 888;
/// Where the stand-in web server answers its image's health check.
const WEBSRV_PORT: u16 = 8903;

/// As PID 1 of a container a process gets no default signal handling, so
/// the programs that do handle SIGTERM say so; they take a moment to flush.
fn exit_on_termination() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                std::thread::sleep(Duration::from_millis(300));
                std::process::exit(0);
            }
        });
    }
}

/// The effective uid, read from `/proc/self` (owned by the process's euid).
fn uid() -> Result<u32, String> {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("/proc/self: {e}"))
}

fn require_uid(want: u32, who: &str) -> Result<(), String> {
    match uid()? {
        u if u == want => Ok(()),
        u => Err(format!("must run as {who} (uid {want}), not uid {u}")),
    }
}

fn main() -> ExitCode {
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
    if program != "im" || std::env::var("FAKE_IM_SIGTERM").as_deref() != Ok("ignore") {
        exit_on_termination();
    }
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
    require_uid(PORTSIP_UID, "portsip")?;
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
    if std::env::var("FAKE_IM_CRASH").as_deref() == Ok("start") {
        return Err("fatal: cannot open the message store (stand-in crash at start)".into());
    }
    let ini = std::fs::read_to_string(dir.join("system.ini"))
        .map_err(|e| format!("{}/system.ini: {e}", dir.display()))?;
    let password = ini_value(&ini, "database", "superuser_password")
        .ok_or("system.ini has no [database] superuser_password")?;
    wait_for_port(5432, Duration::from_secs(60))?;
    db_login("postgres", &password)?;
    // The real IM writes all over its tree (message store, logs, uploads).
    check_writable_tree(&dir)?;
    let im_dir = dir.join("im");
    for sub in ["", "logs", "storage"] {
        let d = im_dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let write = |path: PathBuf, text: String| {
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))
    };
    write(
        im_dir.join("fake-im.state"),
        format!(
            "pbx={pbx}\nprivate={private}\npublic={public}\nextended={}\n",
            args.iter().any(|a| a == "-E")
        ),
    )?;
    write(im_dir.join("logs/im.log"), "started\n".into())?;
    write(im_dir.join("storage/.fake-im-probe"), "ok\n".into())?;
    let healthy = std::env::var("FAKE_IM_HEALTH").as_deref() != Ok("never");
    let clients = TcpListener::bind(("0.0.0.0", 8887)).map_err(|e| format!("bind 8887: {e}"))?;
    let stats = TcpListener::bind(("0.0.0.0", 8902)).map_err(|e| format!("bind 8902: {e}"))?;
    // As careless as a real server may be: the token goes to the log.
    eprintln!("im: registered with pbx {pbx} using token {token}");
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

/// Fails unless this process can write every directory and regular file
/// under `root` (links are not followed), as the real IM would on first use.
fn check_writable_tree(root: &Path) -> Result<(), String> {
    let denied = |path: &Path, e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut pending = vec![root.to_owned()];
    let mut seen = 0;
    while let Some(dir) = pending.pop() {
        let probe = dir.join(format!(".fake-im-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|e| denied(&dir, e))?;
        let _ = std::fs::remove_file(&probe);
        for entry in std::fs::read_dir(&dir).map_err(|e| denied(&dir, e))? {
            let entry = entry.map_err(|e| denied(&dir, e))?;
            let kind = entry.file_type().map_err(|e| denied(&entry.path(), e))?;
            seen += 1;
            if seen > 10_000 {
                return Ok(());
            }
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(entry.path())
                    .map_err(|e| denied(&entry.path(), e))?;
            }
        }
    }
    Ok(())
}

/// `key` in `[section]` of an INI text.
fn ini_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = "";
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim();
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(v.trim().to_owned()).filter(|v| !v.is_empty());
        }
    }
    None
}

/// One line to the stand-in database on 5432; its one-line answer.
fn db_request(line: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", 5432))
        .map_err(|e| format!("connect to the database on 127.0.0.1:5432: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("the database did not answer: {e}"))?;
    Ok(answer.trim().to_owned())
}

fn db_login(user: &str, password: &str) -> Result<(), String> {
    match db_request(&format!("AUTH {user} {password}"))?.as_str() {
        "OK" => Ok(()),
        _ => Err(format!(
            "FATAL: password authentication failed for user \"{user}\""
        )),
    }
}

fn serve_stats(stream: TcpStream, healthy: bool, started: Instant) -> std::io::Result<()> {
    serve_http(stream, |request| {
        if !request.starts_with("GET /svr_stats") {
            ("404 Not Found", String::from("{}"))
        } else if healthy {
            (
                "200 OK",
                format!(
                    "{{\"status\":\"ok\",\"version\":\"{}\",\"online_users\":0,\"uptime\":{}}}",
                    version(),
                    started.elapsed().as_secs()
                ),
            )
        } else {
            (
                "503 Service Unavailable",
                String::from("{\"status\":\"starting\"}"),
            )
        }
    })
}

/// Answers one HTTP request: `respond` gets the request line.
fn serve_http(
    mut stream: TcpStream,
    respond: impl FnOnce(&str) -> (&'static str, String),
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Read the rest of the request head so closing never resets the client.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let (status, body) = respond(&line);
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The version the image stands in for (`FAKE_IM_VERSION`, set by the image).
fn version() -> String {
    std::env::var("FAKE_IM_VERSION").unwrap_or_else(|_| "22.0.0-fake".into())
}

fn initdt(args: &[String]) -> Result<(), String> {
    require_uid(PORTSIP_UID, "portsip")?;
    let dir = PathBuf::from(required(args, "-D")?);
    let user = required(args, "--pg-superuser-name")?;
    let password = required(args, "--pg-superuser-password")?;
    if user.is_empty() || password.len() < 8 {
        return Err("superuser name or password missing".into());
    }
    wait_for_port(5432, Duration::from_secs(60))?;
    db_login(user, password)?;
    std::fs::write(dir.join("VERSION"), format!("{}\n", version()))
        .map_err(|e| format!("write {}/VERSION: {e}", dir.display()))?;
    eprintln!("initdt: database initialised for {}", dir.display());
    Ok(())
}

fn websrv(args: &[String]) -> Result<(), String> {
    if args.first().map(String::as_str) != Some("websrv") {
        return Err("usage: run_im_websrv.sh websrv serve -n websrv -D <dir>".into());
    }
    require_uid(PORTSIP_UID, "portsip")?;
    let dir = PathBuf::from(required(args, "-D")?);
    std::fs::write(dir.join("im").join("fake-websrv.state"), "running\n")
        .map_err(|e| format!("write to data dir: {e}"))?;
    // Starting takes a moment: its health check is "starting" meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    let listener = TcpListener::bind(("0.0.0.0", WEBSRV_PORT))
        .map_err(|e| format!("bind {WEBSRV_PORT}: {e}"))?;
    eprintln!("websrv: running on {WEBSRV_PORT}");
    for stream in listener.incoming().flatten() {
        let _ = serve_http(stream, |_| ("200 OK", String::from("{\"status\":\"ok\"}")));
    }
    Ok(())
}

fn postgres() -> Result<(), String> {
    let me = uid()?;
    if me == 0 {
        return Err("\"root\" execution of the PostgreSQL server is not permitted".into());
    }
    let data = PathBuf::from(
        std::env::var("PGDATA").unwrap_or_else(|_| "/var/lib/postgresql/data".into()),
    );
    let meta = std::fs::metadata(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    if meta.uid() != me {
        return Err(format!(
            "data directory \"{}\" has wrong ownership (owned by uid {}, server runs as {me})",
            data.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o700 && mode != 0o750 {
        return Err(format!(
            "data directory \"{}\" has invalid permissions {mode:o}: should be 0700 or 0750",
            data.display()
        ));
    }
    let stored = data.join("fake-superuser-password");
    let password = if data.join("PG_VERSION").exists() {
        // Initialised: the password is what it was set to then.
        std::fs::read_to_string(&stored).map_err(|e| format!("{}: {e}", stored.display()))?
    } else {
        // initdb refuses a directory that holds anything but lost+found.
        let stray = std::fs::read_dir(&data)
            .map_err(|e| format!("{}: {e}", data.display()))?
            .filter_map(Result::ok)
            .any(|e| e.file_name() != "lost+found");
        if stray {
            return Err(format!(
                "initdb: error: directory \"{}\" exists but is not empty",
                data.display()
            ));
        }
        let password = std::env::var("POSTGRES_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty())
            .ok_or(
                "Database is uninitialized and superuser password is not specified. \
                 You must specify POSTGRES_PASSWORD to a non-empty value for the superuser.",
            )?;
        let write = |name: &str, text: &str| {
            std::fs::write(data.join(name), text).map_err(|e| format!("initdb {name}: {e}"))
        };
        write("fake-superuser-password", &password)?;
        std::fs::set_permissions(&stored, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        write("PG_VERSION", "14\n")?;
        password
    };
    let listener = TcpListener::bind(("0.0.0.0", 5432)).map_err(|e| format!("bind 5432: {e}"))?;
    eprintln!("postgres: ready to accept connections on 5432");
    for stream in listener.incoming().flatten() {
        let _ = answer_db(stream, &password);
    }
    Ok(())
}

fn answer_db(stream: TcpStream, password: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let answer = match (words.next(), words.next(), words.next()) {
        (Some("PING"), _, _) => "READY",
        (Some("AUTH"), Some("postgres"), Some(given)) if given == password => "OK",
        _ => "FAIL",
    };
    (&stream).write_all(format!("{answer}\n").as_bytes())
}

fn pg_isready(args: &[String]) -> Result<(), String> {
    let host = flag(args, "-h").unwrap_or("127.0.0.1");
    let port = flag(args, "-p").unwrap_or("5432");
    if host != "127.0.0.1" && host != "localhost" || port != "5432" {
        return Err(format!(
            "{host}:{port} - the stand-in only checks 127.0.0.1:5432"
        ));
    }
    match db_request("PING") {
        Ok(answer) if answer == "READY" => {
            println!("{host}:{port} - accepting connections");
            Ok(())
        }
        _ => Err(format!("{host}:{port} - no response")),
    }
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
