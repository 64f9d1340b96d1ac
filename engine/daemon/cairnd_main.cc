// cairnd: Cairn's replicator daemon. See docs/OPERATIONS.md.
//
//   cairnd -c /etc/cairn/cairnd.conf [--check | --check-config]
#include <execinfo.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "engine/daemon/daemon.h"
#include "engine/format/payload_cache.h"

namespace {

// The command line: the config file and what to do with it.
struct Args {
  std::string config_path;
  bool check_only = false;   // check the config and the cluster, then exit
  bool config_only = false;  // parse the config only, then exit
};

// nullopt: exit with `*code` (usage, or --help).
std::optional<Args> ParseArgs(int argc, char** argv, int* code) {
  Args args;
  CLI::App app{"cairnd: Cairn's replicator daemon (docs/OPERATIONS.md)", "cairnd"};
  app.add_option("-c,--config", args.config_path, "the INI file (docs/OPERATIONS.md)")->required();
  app.add_flag("--check", args.check_only, "validate the config and the cluster, then exit");
  app.add_flag("--check-config", args.config_only,
               "validate the config file alone (no cluster, no files it names), then exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    *code = app.exit(e) == 0 ? 0 : 2;
    return std::nullopt;
  }
  return args;
}

void TuneProcess() {
  // Every volume holds a socket (and a sink one per source volume): the
  // soft limit on open files (often 1024) goes up to the hard one.
  if (rlimit files{}; getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    const rlim_t was = files.rlim_cur;
    files.rlim_cur = files.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &files) == 0) {
      spdlog::debug("open files limit raised from {} to {}", was, files.rlim_max);
    }
  }
}

// A crash leaves its signal and stack in the log (stderr), then dies of
// the signal as it would have (a core, if allowed): what an operator sends
// with a bug report. Only async-signal-safe calls, but backtrace's first
// call, made here, loads libgcc beforehand.
void InstallCrashReport() {
  void* warm[1];
  backtrace(warm, 1);
  struct sigaction sa {};
  sa.sa_flags = SA_RESETHAND | SA_NODEFER;
  sa.sa_handler = [](int sig) {
    static const char kHead[] = "cairnd: fatal signal; the stack follows (addr2line -e cairnd)\n";
    [[maybe_unused]] ssize_t n = write(STDERR_FILENO, kHead, sizeof kHead - 1);
    void* frames[64];
    backtrace_symbols_fd(frames, backtrace(frames, 64), STDERR_FILENO);
    raise(sig);
  };
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) sigaction(sig, &sa, nullptr);
  std::set_terminate([] {
    // An exception no one caught: its text first, then SIGABRT's stack.
    if (auto e = std::current_exception()) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        spdlog::critical("uncaught exception: {}", x.what());
      } catch (...) {
        spdlog::critical("uncaught exception of an unknown type");
      }
    }
    spdlog::shutdown();
    std::abort();
  });
}

// Blocks the stop signals (SIGINT, SIGTERM) in this thread and every thread
// it starts from now on, and returns them for WaitForStop.
sigset_t BlockStopSignals() {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  return stop_signals;
}

// `cairnd --check`: prints the daemon's report; exit code 1 if it cannot
// replicate.
int RunCheck(cairn::Daemon& daemon, const std::string& config_path) {
  std::vector<std::string> report;
  const cairn::Status st = daemon.Check(&report);
  for (const auto& line : report) std::printf("cairnd: %s\n", line.c_str());
  if (!st.ok()) {
    std::fprintf(stderr, "cairnd: %s cannot replicate: %s\n", config_path.c_str(),
                 st.ToString().c_str());
    return 1;
  }
  std::printf("cairnd: configuration %s is valid\n", config_path.c_str());
  return 0;
}

// Returns the first of `stop_signals` to arrive.
int WaitForStop(const sigset_t& stop_signals) {
  // While it waits, the main thread frees the payload buffers kept for
  // the next frame once they stay unused (payload_cache.h); the allocator
  // hands freed pages back by itself (malloc_conf.cc).
  int sig = -1;
  const timespec trim_every{10, 0};
  while (sig < 0) {
    sig = sigtimedwait(&stop_signals, nullptr, &trim_every);
    if (sig < 0) cairn::payload_cache::TrimIdle();
  }
  return sig;
}

}  // namespace

int main(int argc, char** argv) {
  int code = 0;
  const std::optional<Args> args = ParseArgs(argc, argv, &code);
  if (!args) return code;

  auto cfg = cairn::LoadConfig(args->config_path);
  if (!cfg.ok()) {
    std::fprintf(stderr, "cairnd: %s\n", cfg.status().message().c_str());
    return 2;
  }
  if (args->config_only) {
    std::printf("cairnd: %s parses\n", args->config_path.c_str());
    return 0;
  }
  spdlog::set_level(spdlog::level::from_str(cfg->log_level));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [" + cfg->site + "] %v");
  TuneProcess();
  InstallCrashReport();
  const sigset_t stop_signals = BlockStopSignals();

  auto daemon = cairn::Daemon::Create(*cfg);
  if (!daemon.ok()) {
    std::fprintf(stderr, "cairnd: %s\n", daemon.status().ToString().c_str());
    return 1;
  }
  if (args->check_only) return RunCheck(**daemon, args->config_path);
  if (cairn::Status st = (*daemon)->Start(); !st.ok()) {
    std::fprintf(stderr, "cairnd: %s\n", st.ToString().c_str());
    return 1;
  }
  // Under systemd (Type=notify): ready once the control socket, the
  // listener and every volume are up. A no-op without $NOTIFY_SOCKET.
  sd_notifyf(0, "READY=1\nSTATUS=site %s: serving\nMAINPID=%lu", cfg->site.c_str(),
             static_cast<unsigned long>(getpid()));
  const int sig = WaitForStop(stop_signals);
  spdlog::info("signal {}: stopping", strsignal(sig));
  sd_notify(0, "STOPPING=1\nSTATUS=stopping");
  (*daemon)->Stop();
  return 0;
}
