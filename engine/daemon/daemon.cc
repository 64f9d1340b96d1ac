#include "engine/daemon/daemon.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>

#include "engine/ceph/rados_kv_store.h"

namespace cairn {
namespace {

// A client address nobody has (TEST-NET-1, RFC 5737): blocklisting it for a
// second shows that this user may blocklist, before a crash needs it.
constexpr char kProbeAddr[] = "192.0.2.1:0/1";

std::string HostName() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "";
  return buf;
}

std::string BootId() {
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string id;
  std::getline(f, id);
  return id;
}

// True if `prev` (a sink instance recorded in a catalog) is certainly not
// running any more: it ran on this host, and the host rebooted since, or
// its pid is gone or is now another program (or this process). Only decides
// how loudly a fence is logged.
bool CertainlyGone(const SinkInstance& prev, const SinkInstance& self) {
  if (prev.host.empty() || prev.host != self.host) return false;
  if (!prev.boot_id.empty() && !self.boot_id.empty() && prev.boot_id != self.boot_id) return true;
  if (prev.pid <= 0) return false;
  if (prev.pid == self.pid) return true;
  if (kill(static_cast<pid_t>(prev.pid), 0) != 0 && errno == ESRCH) return true;
  std::ifstream comm(fmt::format("/proc/{}/comm", prev.pid));
  std::string name;
  return std::getline(comm, name) && name != "cairnd";
}

}  // namespace

StatusOr<std::unique_ptr<Daemon>> Daemon::Create(DaemonConfig config) {
  std::unique_ptr<Daemon> d(new Daemon(std::move(config)));
  const CephConfig& ceph = d->config_.ceph;
  auto cluster = RbdCluster::Connect(ceph.conf, ceph.client, ceph.keyring, ceph.op_timeout);
  if (!cluster.ok()) return cluster.status().Annotate("connecting to the local Ceph cluster");
  d->cluster_ = *cluster;
  d->budget_ = std::make_shared<MemoryBudget>(d->config_.memory_budget);
  if (d->config_.sink) {
    for (const auto& pool : d->config_.sink->pools) {
      auto p = d->OpenPool(pool);
      if (!p.ok()) return p.status().Annotate("[sink] pools");
    }
  }
  for (const auto& v : d->config_.volumes) {
    auto p = d->OpenPool(v.pool);
    if (!p.ok()) return p.status().Annotate(fmt::format("[volume {}] pool", v.id));
    auto exists = (*p)->Exists(v.image);
    if (!exists.ok()) return exists.status().Annotate(fmt::format("[volume {}]", v.id));
    if (!*exists) {
      spdlog::warn("volume {}: image {}/{} does not exist (yet); replication starts when it does",
                   v.id, v.pool, v.image);
    }
  }
  return d;
}

Daemon::~Daemon() { Stop(); }

StatusOr<std::shared_ptr<Pool>> Daemon::OpenPool(const std::string& name) {
  std::lock_guard lock(mu_);
  if (auto it = pools_.find(name); it != pools_.end()) return it->second;
  ASSIGN_OR_RETURN(auto pool, cluster_->OpenPool(name));
  pools_[name] = pool;
  return std::shared_ptr<Pool>(pool);
}

StatusOr<std::shared_ptr<KvStore>> Daemon::OpenCatalog(const std::string& pool) {
  std::lock_guard lock(mu_);
  if (auto it = catalogs_.find(pool); it != catalogs_.end()) return it->second;
  ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(pool, kCatalogObject));
  catalogs_[pool] = kv;
  return std::shared_ptr<KvStore>(kv);
}

Status Daemon::FencePreviousSink() {
  const SinkConfig& sc = *config_.sink;
  ASSIGN_OR_RETURN(std::string addr, cluster_->ClientAddress());
  SinkInstance self;
  self.addr = addr;
  self.site = config_.site;
  self.host = HostName();
  self.pid = getpid();
  self.boot_id = BootId();
  self.started_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
  std::vector<std::shared_ptr<KvStore>> stores;
  std::vector<std::pair<std::string, KvStore*>> catalogs;
  for (const auto& pool : sc.pools) {
    ASSIGN_OR_RETURN(auto kv, OpenCatalog(pool));
    catalogs.emplace_back(pool, kv.get());
    stores.push_back(std::move(kv));
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto fenced = FenceAndRegisterSink(catalogs, self, [this](const SinkInstance& prev) {
    return cluster_->Blocklist(prev.addr, kFenceExpire);
  });
  if (!fenced.ok()) return fenced.status();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  for (const FencedSink& f : *fenced) {
    if (CertainlyGone(f.instance, self)) {
      spdlog::info(
          "sink: fenced the previous sink instance {} of pool(s) {} ({:.0f} ms): it no longer "
          "runs; its watches and locks on the standby images are gone, its I/O refused for {} s",
          DescribeSinkInstance(f.instance), fmt::join(f.pools, ", "), ms, kFenceExpire.count());
    } else {
      spdlog::warn(
          "sink: fenced the previous sink instance {} of pool(s) {} ({:.0f} ms): its watches and "
          "locks on the standby images are gone, its I/O refused for {} s; if it still runs, it "
          "stops (one sink per pool: this one takes over)",
          DescribeSinkInstance(f.instance), fmt::join(f.pools, ", "), ms, kFenceExpire.count());
    }
  }
  if (fenced->empty()) {
    // Nothing to fence (a first start): check now that this user may, so
    // that a missing cap shows today rather than after a crash.
    if (Status st = cluster_->Blocklist(kProbeAddr, std::chrono::seconds(1)); !st.ok()) {
      return st.Annotate(fmt::format(
          "checking that this sink could fence a crashed one (blocklisting {}, an address no "
          "client has, for 1 s)",
          kProbeAddr));
    }
  }
  sink_instance_ = self;
  spdlog::info("sink: registered as sink instance {} in pool(s) {}", self.addr,
               fmt::join(sc.pools, ", "));
  return OkStatus();
}

std::string Daemon::FencedBy() {
  for (const auto& pool : config_.sink->pools) {
    auto kv = OpenCatalog(pool);
    if (!kv.ok()) continue;
    auto rec = Catalog(**kv).SinkInstanceRecord();
    if (rec.ok()) {
      if (*rec && (*rec)->instance.addr != sink_instance_.addr) {
        return fmt::format(
            "sink instance {} registered in pool {} after this one ({}) and fenced it",
            DescribeSinkInstance((*rec)->instance), pool, sink_instance_.addr);
      }
      continue;
    }
    auto blocklisted = cluster_->Blocklisted(pool, kCatalogObject);
    if (blocklisted.ok() && *blocklisted) {
      return fmt::format(
          "this sink ({}) was blocklisted by another client (the catalog of pool "
          "{} answers: {})",
          sink_instance_.addr, pool, rec.status().ToString());
    }
  }
  return "";
}

void Daemon::WatchFencing() {
  std::unique_lock lock(fence_mu_);
  while (!fence_cv_.wait_for(lock, kFenceCheckPeriod, [&] { return fence_stop_; })) {
    lock.unlock();
    const std::string why = FencedBy();
    lock.lock();
    if (!why.empty() && !fence_stop_) {
      spdlog::error("sink: {}; stopping this cairnd", why);
      kill(getpid(), SIGTERM);  // cairnd_main stops the daemon as on any SIGTERM
      return;
    }
  }
}

Status Daemon::Start() {
  if (config_.sink) {
    const SinkConfig& sc = *config_.sink;
    std::error_code ec;
    std::filesystem::create_directories(sc.spool_dir, ec);
    if (ec) {
      return FailedPrecondition(
          fmt::format("[sink] spool_dir {} cannot be created: {}", sc.spool_dir, ec.message()));
    }
    // Port first: a second cairnd started by mistake with this config on
    // this host stops here, before it fences the one that runs.
    auto listener = Listener::ListenTcp(sc.listen_host, sc.listen_port);
    if (!listener.ok()) return listener.status().Annotate("[sink] listen");
    // Before any source is served and any spool recovered, the previous
    // instance must be unable to touch the standby images.
    RETURN_IF_ERROR(FencePreviousSink().Annotate("[sink] fencing the previous sink instance"));
    fence_watch_ = std::thread([this] { WatchFencing(); });
    SinkEnv env;
    env.site = config_.site;
    env.spool_dir = sc.spool_dir;
    env.pools = sc.pools;
    env.cluster = config_.ceph.conf;
    env.spool.max_bytes = sc.spool_max_bytes;
    env.keep_points = sc.keep_points;
    env.apply.window = sc.window;
    env.apply.window_bytes = sc.window_bytes;
    env.budget = budget_;
    env.open_pool = [this](const std::string& p) { return OpenPool(p); };
    env.open_catalog = [this](const std::string& p) { return OpenCatalog(p); };
    sink_ = std::make_unique<Sink>(env);
    sink_server_ =
        std::make_unique<LinkServer>("sink", std::move(listener).value(), [this](Link& l) {
          Status st = sink_->Serve(l);
          if (!st.ok()) spdlog::warn("sink: session with {} ended: {}", l.peer(), st.ToString());
        });
    sink_server_->Start();
    spdlog::info("sink listening on {}:{}, spool {}", sc.listen_host, sink_server_->port(),
                 sc.spool_dir);
  }

  for (const auto& v : config_.volumes) {
    ASSIGN_OR_RETURN(auto src, StartSource(v));
    std::lock_guard lock(sources_mu_);
    sources_.push_back(std::move(src));
  }
  RETURN_IF_ERROR(StartRegistered());
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(config_.control_socket).parent_path(),
                                      ec);
  auto control = Listener::ListenUnix(config_.control_socket);
  if (!control.ok()) return control.status().Annotate("[cairnd] control_socket");
  control_server_ =
      std::make_unique<LinkServer>("control", std::move(control).value(), [this](Link& l) {
        while (true) {
          auto f = l.Receive(std::chrono::minutes(10));
          if (!f.ok()) return;
          const std::string reply = HandleControl(*this, *f);
          if (!l.Send(FrameType::kControlReply, reply, {}).ok()) return;
        }
      });
  control_server_->Start();

  spdlog::info("cairnd (site {}) ready; control socket {}", config_.site, config_.control_socket);
  return OkStatus();
}

void Daemon::Stop() {
  // The control server goes first: its requests walk sources_ and sink_.
  if (control_server_) control_server_->Stop();
  control_server_.reset();
  if (fence_watch_.joinable()) {
    {
      std::lock_guard lock(fence_mu_);
      fence_stop_ = true;
    }
    fence_cv_.notify_all();
    fence_watch_.join();
  }
  std::vector<std::shared_ptr<SourceReplicator>> sources;
  {
    std::lock_guard lock(sources_mu_);
    sources.swap(sources_);
  }
  // All at once: each ends what it is doing (a read window, a snapshot)
  // while the others do the same.
  for (auto& s : sources) s->RequestStop();
  for (auto& s : sources) s->Stop();
  if (sink_server_) sink_server_->Stop();
  sink_server_.reset();
}

std::shared_ptr<SourceReplicator> Daemon::FindSource(const std::string& volume) {
  std::lock_guard lock(sources_mu_);
  for (const auto& s : sources_) {
    if (s->config().id == volume) return s;
  }
  return nullptr;
}

StatusOr<std::vector<VolumeStatusInfo>> Daemon::VolumeStatus(const std::string& volume) {
  std::vector<VolumeStatusInfo> out;
  std::vector<std::shared_ptr<SourceReplicator>> sources;
  {
    std::lock_guard lock(sources_mu_);
    sources = sources_;
  }
  for (const auto& s : sources) {
    if (volume.empty() || s->config().id == volume) out.push_back(s->Report());
  }
  if (sink_) {
    for (auto& s : sink_->Report()) {
      if (volume.empty() || s.volume == volume) out.push_back(std::move(s));
    }
  }
  if (!volume.empty() && out.empty()) {
    return NotFound(fmt::format("volume '{}' is not known to this cairnd", volume));
  }
  return out;
}

StatusOr<std::vector<RestorePoint>> Daemon::Points(const std::string& volume) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: ask the cairnd of the standby site");
  }
  return sink_->Points(volume);
}

StatusOr<RestoreResult> Daemon::Restore(const std::string& volume, uint64_t seq,
                                        const std::string& to_image, bool full) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: restore on the standby site's cairnd");
  }
  return sink_->Restore(volume, seq, to_image, full, nullptr);
}

StatusOr<uint64_t> Daemon::Replicate(const std::string& volume) {
  if (auto s = FindSource(volume)) return s->RequestNow();
  return NotFound(
      fmt::format("volume '{}' is not replicated from this cairnd (no [volume {}], not registered)",
                  volume, volume));
}

// --- volumes registered at run time ----------------------------------------
namespace {

constexpr char kRegistryObject[] = "cairn.registry";

// registry omap: volume/<id> -> "pool=P\nimage=I\ntarget_pool=TP\ntarget_image=TI\n"
std::string EncodeRegistration(const Registration& r) {
  return fmt::format("pool={}\nimage={}\ntarget_pool={}\ntarget_image={}\n", r.pool, r.image,
                     r.target_pool, r.target_image);
}

StatusOr<Registration> DecodeRegistration(const std::string& key, const std::string& text) {
  Registration r;
  r.volume = key.substr(key.find('/') + 1);
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) {
      return DataLoss(fmt::format("{} {}: malformed line '{}'", kRegistryObject, key, line));
    }
    const std::string k = line.substr(0, eq), v = line.substr(eq + 1);
    if (k == "pool")
      r.pool = v;
    else if (k == "image")
      r.image = v;
    else if (k == "target_pool")
      r.target_pool = v;
    else if (k == "target_image")
      r.target_image = v;
  }
  if (r.pool.empty() || r.image.empty()) {
    return DataLoss(fmt::format("{} {}: no pool or image in '{}'", kRegistryObject, key, text));
  }
  return r;
}

bool SameRegistration(const Registration& a, const Registration& b) {
  return a.pool == b.pool && a.image == b.image && a.target_pool == b.target_pool &&
         a.target_image == b.target_image;
}

}  // namespace

StatusOr<std::shared_ptr<SourceReplicator>> Daemon::StartSource(const VolumeConfig& v) {
  ASSIGN_OR_RETURN(auto pool, OpenPool(v.pool));
  LinkOptions lo;
  lo.connect_timeout = std::chrono::seconds(5);
  lo.stall_timeout = std::chrono::seconds(120);
  auto src = std::make_shared<SourceReplicator>(
      v, config_.site, pool, [v, lo]() { return ConnectTcp(v.peer_host, v.peer_port, lo); });
  src->set_memory_budget(budget_);
  src->Start();
  spdlog::info("volume {}: replicating {}/{} to {}:{} as {}/{} every {} ms", v.id, v.pool, v.image,
               v.peer_host, v.peer_port, v.target_pool, v.target_image, v.interval.count());
  return src;
}

VolumeConfig Daemon::RegisteredVolume(const Registration& r) const {
  const auto& src = *config_.source;
  VolumeConfig v;
  v.id = r.volume;
  v.pool = r.pool;
  v.image = r.image;
  v.peer_host = src.peer_host;
  v.peer_port = src.peer_port;
  v.target_pool = r.target_pool.empty() ? r.pool : r.target_pool;
  v.target_image = r.target_image.empty() ? r.image + ".standby" : r.target_image;
  v.interval = src.interval;
  v.keep_snapshots = src.keep_snapshots;
  v.outage_snapshots = src.outage_snapshots;
  return v;
}

Status Daemon::StartRegistered() {
  if (!config_.source) return OkStatus();
  for (const auto& pool : config_.source->pools) {
    auto kv = cluster_->OpenKvStore(pool, kRegistryObject);
    if (!kv.ok()) return kv.status().Annotate("[source] pools: " + pool);
    auto entries = (*kv)->Scan("volume/");
    if (!entries.ok()) return entries.status().Annotate("reading the registry in pool " + pool);
    for (const auto& [key, text] : *entries) {
      auto r = DecodeRegistration(key, text);
      if (!r.ok()) {
        spdlog::error("pool {}: skipping a registration: {}", pool, r.status().ToString());
        continue;
      }
      auto src = StartSource(RegisteredVolume(*r));
      if (!src.ok()) {
        spdlog::error("volume {}: registered but cannot start: {}", r->volume,
                      src.status().ToString());
        continue;
      }
      std::lock_guard lock(sources_mu_);
      sources_.push_back(std::move(src).value());
      registered_[r->volume] = *r;
    }
  }
  return OkStatus();
}

StatusOr<VolumeStatusInfo> Daemon::Register(const Registration& req) {
  if (!config_.source) {
    return FailedPrecondition(
        "this cairnd takes no registrations: add a [source] section (pools, peer) to its config");
  }
  RETURN_IF_ERROR(ValidateVolumeId(req.volume));
  if (req.image.empty()) return InvalidArgument("register: no image");
  const auto& pools = config_.source->pools;
  if (std::find(pools.begin(), pools.end(), req.pool) == pools.end()) {
    return FailedPrecondition(
        fmt::format("pool '{}' is not one of this cairnd's [source] pools ({}): add it there",
                    req.pool, fmt::join(pools, ", ")));
  }
  Registration r = req;
  const VolumeConfig v = RegisteredVolume(r);
  r.target_pool = v.target_pool;
  r.target_image = v.target_image;
  ASSIGN_OR_RETURN(auto pool, OpenPool(r.pool));
  ASSIGN_OR_RETURN(bool exists, pool->Exists(r.image));
  if (!exists) {
    return NotFound(
        fmt::format("image {}/{} does not exist at site {}", r.pool, r.image, config_.site));
  }
  std::lock_guard registering(register_mu_);
  bool known = false;
  {
    std::lock_guard lock(sources_mu_);
    if (auto it = registered_.find(r.volume); it != registered_.end()) {
      if (!SameRegistration(it->second, r)) {
        return AlreadyExists(fmt::format(
            "volume '{}' is registered already, for {}/{} -> {}/{}: unregister it first", r.volume,
            it->second.pool, it->second.image, it->second.target_pool, it->second.target_image));
      }
      known = true;
    } else {
      for (const auto& s : sources_) {
        const auto& c = s->config();
        if (c.id == r.volume) {
          return AlreadyExists(
              fmt::format("volume '{}' is defined in this cairnd's config file", r.volume));
        }
        if (c.pool == r.pool && c.image == r.image) {
          return AlreadyExists(fmt::format("image {}/{} is replicated already, as volume '{}'",
                                           r.pool, r.image, c.id));
        }
      }
    }
  }
  if (!known) {
    ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(r.pool, kRegistryObject));
    RETURN_IF_ERROR(kv->Commit({{"volume/" + r.volume, EncodeRegistration(r)}}, {}));
    ASSIGN_OR_RETURN(auto src, StartSource(v));
    std::lock_guard lock(sources_mu_);
    sources_.push_back(std::move(src));
    registered_[r.volume] = r;
  }
  if (auto s = FindSource(r.volume)) return s->Report();
  return Internal("registered volume vanished");
}

Status Daemon::Unregister(const std::string& volume, bool remove_snapshots) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  std::lock_guard registering(register_mu_);
  std::shared_ptr<SourceReplicator> stopped;
  Registration r;
  {
    std::lock_guard lock(sources_mu_);
    auto it = registered_.find(volume);
    if (it == registered_.end()) {
      for (const auto& s : sources_) {
        if (s->config().id == volume) {
          return FailedPrecondition(fmt::format(
              "volume '{}' is defined in this cairnd's config file: remove its [volume] section",
              volume));
        }
      }
      return NotFound(fmt::format("volume '{}' is not registered at this cairnd", volume));
    }
    r = it->second;
  }
  ASSIGN_OR_RETURN(auto kv, cluster_->OpenKvStore(r.pool, kRegistryObject));
  RETURN_IF_ERROR(kv->Commit({}, {"volume/" + volume}));
  {
    std::lock_guard lock(sources_mu_);
    registered_.erase(volume);
    for (auto s = sources_.begin(); s != sources_.end(); ++s) {
      if ((*s)->config().id == volume) {
        stopped = std::move(*s);
        sources_.erase(s);
        break;
      }
    }
  }
  if (stopped) stopped->Stop();
  if (remove_snapshots) {
    ASSIGN_OR_RETURN(auto pool, OpenPool(r.pool));
    auto vol = pool->Open(r.image);
    if (!vol.ok()) {
      if (vol.status().code() == Code::kNotFound) return OkStatus();  // the image went first
      return vol.status();
    }
    ASSIGN_OR_RETURN(auto snaps, (*vol)->ListSnaps());
    for (const auto& s : snaps) {
      if (ParseSnapName(s.name)) RETURN_IF_ERROR((*vol)->RemoveSnap(s.name));
    }
  }
  spdlog::info("volume {}: unregistered ({}/{}){}", volume, r.pool, r.image,
               remove_snapshots ? ", its cairn snapshots removed" : "");
  return OkStatus();
}

Status Daemon::Check(std::vector<std::string>* report) {
  Status first;
  const auto note = [&](const std::string& what, const Status& st) {
    report->push_back(st.ok() ? "ok: " + what : "FAILED: " + what + ": " + st.message());
    if (first.ok() && !st.ok()) first = st.Annotate(what);
  };
  if (config_.sink) {
    note(fmt::format("[sink] spool_dir {}", config_.sink->spool_dir),
         CheckSpoolWritable(config_.sink->spool_dir));
  }
  std::vector<VolumeConfig> volumes = config_.volumes;
  if (config_.source) {
    for (const auto& pool : config_.source->pools) {
      auto kv = cluster_->OpenKvStore(pool, kRegistryObject);
      auto entries = kv.ok() ? (*kv)->Scan("volume/") : kv.status();
      if (!entries.ok()) {
        note(fmt::format("[source] registry in pool {}", pool), entries.status());
        continue;
      }
      bool any = false;
      for (const auto& [key, text] : *entries) {
        auto r = DecodeRegistration(key, text);
        if (!r.ok()) {
          note("[source] registration " + key, r.status());
          continue;
        }
        volumes.push_back(RegisteredVolume(*r));
        any = true;
      }
      if (!any) {  // nothing registered yet: would the sink take this pool?
        Registration probe;
        probe.volume = "cairn-check";
        probe.pool = pool;
        probe.image = "cairn-check";
        volumes.push_back(RegisteredVolume(probe));
      }
    }
  }
  for (const auto& v : volumes) {
    ASSIGN_OR_RETURN(auto pool, OpenPool(v.pool));
    LinkOptions lo;
    lo.connect_timeout = std::chrono::seconds(5);
    lo.stall_timeout = std::chrono::seconds(10);
    LinkTimeouts timeouts;
    timeouts.hello = std::chrono::seconds(10);
    SourceReplicator probe(
        v, config_.site, pool, [v, lo]() { return ConnectTcp(v.peer_host, v.peer_port, lo); },
        timeouts);
    auto said = probe.Probe();
    note(fmt::format("[volume {}] peer {}:{}{}", v.id, v.peer_host, v.peer_port,
                     said.ok() ? ": " + *said : ""),
         said.status());
  }
  return first;
}

StatusOr<PromoteResult> Daemon::Promote(const std::string& volume, uint64_t seq,
                                        const std::string& pool, const std::string& to_image) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: promote on the standby site's cairnd");
  }
  return sink_->Promote(volume, seq, pool, to_image);
}

StatusOr<std::string> Daemon::Release(const std::string& volume) {
  if (!sink_) {
    return FailedPrecondition("this cairnd is not a sink: release on the standby site's cairnd");
  }
  return sink_->Release(volume);
}

}  // namespace cairn
