//! `cove server`: the whole system in one process on embedded defaults.

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use cove_runner::{Runner, RunnerConfig, SandboxHost};
use cove_server::{Core, CoreConfig};
use cove_store::Store;
use cove_vmm::{Accel, QemuVmm};

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[arg(long, env = "COVE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Metadata database, sandbox disks, bootstrap key.
    #[arg(long, env = "COVE_DATA_DIR", default_value = "/var/lib/cove")]
    data_dir: PathBuf,
    #[command(flatten)]
    host: HostArgs,
    /// Run no VMs in this process: sandboxes run on the runners that register
    /// (`cove runner --control-plane`) or on `--runner`.
    #[arg(long, env = "COVE_NO_LOCAL_RUNNER")]
    no_local_runner: bool,
    /// The token runners sign their leases with (`cove runner --token-file`); made (random,
    /// 0600) on first start. Default: `<data dir>/cluster-token`.
    #[arg(long, env = "COVE_CLUSTER_TOKEN_FILE")]
    cluster_token_file: Option<PathBuf>,
    /// Use the runner at this address (`host:port`, a `cove runner` that does not register
    /// itself) instead of running VMs in this process (implies `--no-local-runner`); with
    /// `--runner-fingerprint` and `--runner-token-file`.
    #[arg(long, env = "COVE_RUNNER", requires_all = ["runner_fingerprint", "runner_token_file"])]
    runner: Option<String>,
    /// SHA-256 fingerprint of the runner's certificate, as `cove runner` prints it.
    #[arg(long, env = "COVE_RUNNER_FINGERPRINT", value_parser = parse_fingerprint)]
    runner_fingerprint: Option<String>,
    /// File holding the runner's token (`<runner data dir>/runner-token`).
    #[arg(long, env = "COVE_RUNNER_TOKEN_FILE")]
    runner_token_file: Option<PathBuf>,
    /// Metadata store on Postgres (`postgres://user:password@host:port/database`; the
    /// database must exist, its tables are made), for a store that outlives this host or is
    /// shared by several control planes. Add `?sslmode=require` for TLS (the server's certificate
    /// verified against the host's roots, or only those of `&sslrootcert=FILE`). Default:
    /// SQLite in `<data dir>/cove.db`.
    #[arg(long, env = "COVE_DATABASE_URL", value_parser = parse_database_url)]
    database_url: Option<String>,
    /// Sandboxes an organization may run at once (starting, running, unpausing, snapshotting or
    /// stopping ones count; paused and stopped ones do not).
    #[arg(long, env = "COVE_SANDBOX_LIMIT", default_value_t = 3)]
    sandbox_limit: u64,
    /// Domain under which sandboxes' own services are reached (`<id>.<domain>`,
    /// `<id>-<port>.<domain>`, presigned `<token>.<domain>`); it may carry a `:port`. Point a
    /// wildcard DNS record at this server. Default: `localhost:<listen port>`, which curl and
    /// browsers resolve to this host by themselves (`sandbox.localhost:<listen port>` with
    /// `--tls-self-signed`).
    #[arg(long, env = "COVE_SANDBOX_DOMAIN")]
    sandbox_domain: Option<String>,
    /// Scheme of the URLs handed out for the sandbox domain. Default: `https` with
    /// `--tls-cert`, else `http`; set `https` when a TLS proxy fronts this server.
    #[arg(long, env = "COVE_PUBLIC_SCHEME")]
    public_scheme: Option<String>,
    /// PEM certificate chain to serve HTTPS with (API and sandbox domain alike; for a public
    /// deployment a certificate for the API's name and `*.<sandbox domain>`).
    #[arg(long, env = "COVE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "COVE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate from a local CA that the server makes and keeps in
    /// `<data dir>/tls/ca.pem` (trust that file in clients), for the sandbox domain, its
    /// wildcard, `localhost` and the listen address. For local use; `--tls-cert` for public.
    #[arg(long, env = "COVE_TLS_SELF_SIGNED", conflicts_with = "tls_cert")]
    tls_self_signed: bool,
    /// Templates an organization may hold.
    #[arg(long, env = "COVE_TEMPLATE_LIMIT", default_value_t = cove_api::template::DEFAULT_TEMPLATE_LIMIT)]
    template_limit: u64,
    /// Address of the SSH endpoint (logins with SSH accesses, `…/ssh/access`); `off` for none.
    #[arg(long, env = "COVE_SSH_LISTEN", default_value = "127.0.0.1:2222")]
    ssh_listen: String,
    /// Host name SSH clients are told to connect to (in `ssh_command`). Default: the SSH
    /// listen address, `localhost` for a loopback or unspecified one.
    #[arg(long, env = "COVE_SSH_HOST")]
    ssh_host: Option<String>,
    /// Address of the Prometheus endpoint (`GET /metrics`, no authentication: it covers every
    /// organization, so keep it on loopback or a private network); `off` for none.
    #[arg(long, env = "COVE_METRICS_LISTEN", default_value = "off")]
    metrics_listen: String,
}

/// How this host runs sandboxes: shared by `cove server` (its in-process runner) and
/// `cove runner`.
#[derive(Args, Debug)]
pub struct HostArgs {
    /// What `cove setup` built (kernel, rootfs, initramfs) and template snapshots.
    #[arg(long, env = "COVE_CACHE_DIR", default_value = "/var/cache/cove")]
    cache_dir: PathBuf,
    /// auto | kvm | tcg
    #[arg(long, env = "COVE_ACCEL", default_value = "auto", value_parser = parse_accel)]
    accel: Accel,
    /// Skip booting the system templates' default shape at start-up (each is then booted by
    /// the first create that needs it).
    #[arg(long, env = "COVE_NO_PREPARE")]
    pub no_prepare: bool,
    /// Where pause images and snapshots are stored: `file:///dir` or `s3://bucket[/prefix]`
    /// (S3 credentials and endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    /// AWS_ENDPOINT_URL). Default: `<data dir>/blobs`.
    #[arg(long, env = "COVE_BLOB_URL")]
    blob_url: Option<String>,
    /// DNS resolver (ip:port) the egress proxy asks for names a sandbox may reach. Default: the
    /// host's first nameserver in /etc/resolv.conf.
    #[arg(long, env = "COVE_EGRESS_DNS")]
    egress_dns: Option<std::net::SocketAddr>,
    /// PEM file of extra CA certificates the egress proxy trusts for upstream TLS (beside the
    /// host's roots), e.g. a company's internal root.
    #[arg(long, env = "COVE_EGRESS_CA")]
    egress_ca: Option<PathBuf>,
    /// A registry (`host:port`) to pull template images from over plain HTTP instead of HTTPS;
    /// repeat for several. Only for registries on a network you trust.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Largest image a template may be made from (its compressed layers), MiB.
    #[arg(long, env = "COVE_MAX_IMAGE_MIB", default_value_t = 16 * 1024)]
    max_image_mib: u64,
    /// Memory this host gives sandboxes, MiB: placement puts no more sandbox memory here.
    /// Default: the host's memory less 2 GiB.
    #[arg(long, env = "COVE_CAPACITY_MEMORY_MIB")]
    capacity_memory_mib: Option<u64>,
    /// vCPUs this host offers sandboxes (reported; placement weighs memory). Default: its cores.
    #[arg(long, env = "COVE_CAPACITY_VCPUS")]
    capacity_vcpus: Option<u32>,
    /// Most sandboxes this host runs at once. Default: as many as fit in its memory.
    #[arg(long, env = "COVE_CAPACITY_SANDBOXES")]
    capacity_sandboxes: Option<u32>,
    /// Unpack a cold resume's RAM (a sandbox paused on another runner) before the guest runs,
    /// instead of serving it lazily from the image as the guest touches it.
    #[arg(long, env = "COVE_EAGER_MEMORY")]
    eager_memory: bool,
}

/// The runner of this machine, on `data_dir`.
pub async fn local_runner(host: &HostArgs, data_dir: &std::path::Path) -> Result<Arc<Runner>> {
    let mut rcfg = RunnerConfig::new(host.cache_dir.clone(), data_dir.to_path_buf());
    rcfg.accel = host.accel;
    rcfg.blob_url = host.blob_url.clone();
    rcfg.egress_dns = host.egress_dns;
    rcfg.egress_extra_ca = host.egress_ca.clone();
    rcfg.insecure_registries = host.insecure_registries.clone();
    rcfg.max_image_bytes = host.max_image_mib << 20;
    rcfg.capacity_memory_mib = host.capacity_memory_mib;
    rcfg.capacity_vcpus = host.capacity_vcpus;
    rcfg.capacity_sandboxes = host.capacity_sandboxes;
    if !host.eager_memory {
        rcfg.lazy_memory = Some(std::env::current_exe().context("locating this program")?);
    }
    let vmm = Arc::new(QemuVmm::new(host.accel));
    tracing::info!(accel = ?vmm.accel, "VM backend: QEMU");
    Ok(Arc::new(Runner::new(rcfg, vmm).await.context("starting the runner")?))
}

/// Boots and saves the default shape of every system template the host has, one after the
/// other (each is a cold boot; the default template comes first), in the background.
pub fn prepare_system_templates(host: Arc<dyn SandboxHost>) {
    tokio::spawn(async move {
        for t in cove_api::template::SYSTEM_TEMPLATES {
            if host.template_disk_mib(t.name).is_none() {
                continue;
            }
            let (vcpus, memory) = (cove_api::sandbox::DEFAULT_VCPU, cove_api::sandbox::DEFAULT_MEMORY_MIB);
            if let Err(e) = host.prepare_template(t.name, vcpus, memory).await {
                tracing::error!(template = t.name, error = %cove_server::error::error_chain(&e), "preparing a system template");
            }
        }
    });
}

fn parse_fingerprint(s: &str) -> Result<String, String> {
    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err("not a SHA-256 fingerprint (64 hex digits, as `cove runner` prints it)".into())
    }
}

fn parse_database_url(s: &str) -> Result<String, String> {
    if cove_store::is_postgres_url(s) {
        Ok(s.to_string())
    } else {
        Err("not a postgres:// or postgresql:// URL".into())
    }
}

fn parse_accel(s: &str) -> Result<Accel, String> {
    Accel::parse(s).ok_or_else(|| format!("{s:?} is not one of auto, kvm, tcg"))
}

pub fn run(args: ServerArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(serve(args))
}

async fn serve(args: ServerArgs) -> Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let store = match &args.database_url {
        Some(url) => Store::connect(url).context("connecting to the Postgres metadata store")?,
        None => Store::open(&args.data_dir.join("cove.db")).context("opening the metadata store")?,
    };
    let store = Arc::new(store);
    bootstrap(&store, &args.data_dir)?;

    let mut ccfg = CoreConfig::local(args.sandbox_limit);
    let cluster_token_file =
        args.cluster_token_file.clone().unwrap_or_else(|| args.data_dir.join("cluster-token"));
    let cluster_token = crate::runner::token(&cluster_token_file)?;
    ccfg.cluster_token = Some(cluster_token.clone());
    let cluster = cove_server::cluster::Cluster::new(store.clone());
    // This machine's RAM directory (`None` without a runner in this process).
    let mut shm_dir = None;
    let mut local = None;
    if args.no_local_runner || args.runner.is_some() {
        // New records name no runner until their VM is placed.
        ccfg.runner_id = String::new();
    } else {
        let runner = local_runner(&args.host, &args.data_dir).await?;
        shm_dir = Some(runner.config().sandbox_shm_dir());
        cluster.join(&ccfg.runner_id, runner.clone());
        local = Some(runner);
    }
    if let Some(addr) = &args.runner {
        let (fingerprint, token_file) = (
            args.runner_fingerprint.as_deref().unwrap_or_default(),
            args.runner_token_file.as_deref().unwrap_or(std::path::Path::new("")),
        );
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the runner token from {}", token_file.display()))?;
        let remote = cove_runner::remote::RemoteHost::connect(addr, fingerprint, token.trim())
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the runner at {addr}: {e}"))?;
        // The runner is its certificate: records name it by its fingerprint.
        let runner_id = cove_server::cluster::runner_id(fingerprint);
        tracing::info!(runner = %addr, %runner_id, "sandboxes run on a remote runner");
        cluster.join(&runner_id, remote);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    ccfg.template_limit = args.template_limit;
    // A certificate cannot name `*.localhost` (a wildcard needs two labels below it), so a
    // self-signed server's default domain is one level down; `.localhost` names still
    // resolve to this host in curl and browsers.
    let default_domain = if args.tls_self_signed { "sandbox.localhost" } else { "localhost" };
    ccfg.sandbox_domain =
        args.sandbox_domain.clone().unwrap_or_else(|| format!("{default_domain}:{}", addr.port()));
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
        _ if args.tls_self_signed => {
            let names = crate::tls::self_signed_names(&ccfg.sandbox_domain, addr);
            let files = crate::tls::self_signed(&args.data_dir.join("tls"), &names)
                .context("making the self-signed TLS certificate")?;
            println!("cove CA certificate {}", files.ca_cert.display());
            Some(crate::tls::acceptor(&files.cert, &files.key)?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    ccfg.public_scheme = args.public_scheme.clone().unwrap_or_else(|| scheme.to_string());
    let sealer = cove_store::sealed::Sealer::open_or_create(&args.data_dir.join("secret.key"))
        .context("opening the key that seals secrets in the metadata store")?;
    let ssh = match args.ssh_listen.as_str() {
        "off" => None,
        at => {
            let at: SocketAddr =
                at.parse().with_context(|| format!("--ssh-listen {at:?} is not ip:port or off"))?;
            let l =
                tokio::net::TcpListener::bind(at).await.with_context(|| format!("binding SSH on {at}"))?;
            let bound = l.local_addr()?;
            let host = args.ssh_host.clone().unwrap_or_else(|| match bound.ip() {
                ip if ip.is_loopback() || ip.is_unspecified() => "localhost".to_string(),
                ip => ip.to_string(),
            });
            ccfg.ssh = Some(cove_server::SshEndpoint { host, port: bound.port() });
            Some((l, bound))
        }
    };
    let core = Arc::new(Core::clustered(store, cluster.clone(), ccfg, sealer));
    core.serve_metadata();
    core.watch_host_restarts();
    core.recover().await.map_err(|e| anyhow::anyhow!("recovering sandboxes: {e}"))?;
    // Runners that register join from now on.
    cluster.watch(Arc::new(move |r: cove_store::RunnerRecord| {
        let token = cluster_token.clone();
        Box::pin(async move {
            let host =
                cove_runner::remote::RemoteHost::connect(&r.lease.address, &r.lease.fingerprint, &token)
                    .await?;
            Ok(host as Arc<dyn SandboxHost>)
        })
    }));
    println!("cove cluster token in {}", cluster_token_file.display());

    if let (Some(runner), false) = (local.clone(), args.host.no_prepare) {
        prepare_system_templates(runner);
    }

    let shutdown = tokio_util::sync::CancellationToken::new();
    cove_server::spawn_background(core.clone(), shutdown.clone());
    if let Some((listener, bound)) = ssh {
        let key = cove_server::sshd::host_key(&args.data_dir.join("ssh_host_ed25519_key"))
            .map_err(|e| anyhow::anyhow!("SSH host key: {e}"))?;
        tokio::spawn(cove_server::sshd::serve(core.clone(), listener, key, shutdown.clone()));
        println!("cove ssh on {bound}");
    }
    if args.metrics_listen != "off" {
        let at: SocketAddr = args
            .metrics_listen
            .parse()
            .with_context(|| format!("--metrics-listen {:?} is not ip:port or off", args.metrics_listen))?;
        let l =
            tokio::net::TcpListener::bind(at).await.with_context(|| format!("binding metrics on {at}"))?;
        println!("cove metrics on http://{}/metrics", l.local_addr()?);
        let stop = shutdown.clone();
        let app = cove_server::metrics::router(core.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    println!("cove listening on {scheme}://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let app = cove_server::router(core);
    let stop = shutdown.clone();
    let signalled = async move {
        wait_for_signal().await;
        tracing::info!("shutting down; sandbox VMs keep running and are adopted at next start");
        stop.cancel();
    };
    match tls {
        Some(acceptor) => {
            tokio::spawn(signalled);
            crate::tls::serve(listener, acceptor, app, shutdown).await?;
        }
        None => {
            // The client's address reaches the invoke route (X-Forwarded-For).
            let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, app).with_graceful_shutdown(signalled).await?
        }
    }
    if let Some(runner) = &local {
        runner.stop_template_builds().await;
    }
    // This data dir's RAM directory goes when no sandbox RAM is left in it (fails otherwise),
    // with its directory for user templates' snapshots if that is empty too.
    if let Some(shm_dir) = shm_dir {
        let _ = std::fs::remove_dir(shm_dir.join("templates"));
        let _ = std::fs::remove_dir(&shm_dir);
    }
    Ok(())
}

pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// On an empty store: creates the `default` organization with `COVE_BOOTSTRAP_API_KEY`, or a
/// generated key that is printed once and written (0600) to `<data>/bootstrap-api-key`.
fn bootstrap(store: &Store, data_dir: &std::path::Path) -> Result<()> {
    if store.org_count()? > 0 {
        return Ok(());
    }
    let org = store.create_org("default", None)?;
    let (key, generated) = match std::env::var("COVE_BOOTSTRAP_API_KEY") {
        Ok(k) if !k.trim().is_empty() => (k.trim().to_string(), false),
        _ => (cove_store::generate_key(), true),
    };
    store.add_key(&org.id, "bootstrap", &key)?;
    if generated {
        let path = data_dir.join("bootstrap-api-key");
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        use std::io::Write;
        writeln!(f, "{key}")?;
        println!("created organization 'default' with API key:\n\n    {key}\n\n(also saved to {}; it is not shown again)", path.display());
    } else {
        println!("created organization 'default' with the key from COVE_BOOTSTRAP_API_KEY");
    }
    Ok(())
}
