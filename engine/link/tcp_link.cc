#include "engine/link/tcp_link.h"

#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <optional>

#include "engine/link/handshake_slots.h"
#include "engine/link/tls_link.h"

namespace cairn {
namespace asio = boost::asio;
using boost::system::error_code;

namespace {

bool IsEof(const error_code& ec) { return ec == asio::error::eof; }

Status FromAsio(const error_code& ec, std::string_view what) {
  if (ec == asio::error::operation_aborted) return Aborted(fmt::format("{}: cancelled", what));
  if (IsEof(ec) || ec == asio::error::connection_reset || ec == asio::error::broken_pipe ||
      ec == asio::error::bad_descriptor) {
    return Aborted(fmt::format("{}: connection closed ({})", what, ec.message()));
  }
  if (ec == asio::error::connection_refused || ec == asio::error::timed_out ||
      ec == asio::error::host_unreachable || ec == asio::error::network_unreachable) {
    return Unavailable(fmt::format("{}: {}", what, ec.message()));
  }
  if (ec == asio::error::address_in_use || ec == asio::error::access_denied) {
    return FailedPrecondition(fmt::format("{}: {}", what, ec.message()));
  }
  return Unavailable(fmt::format("{}: {}", what, ec.message()));
}

// Runs `ctx` until `*done` or `timeout`. On timeout, cancels via `cancel`
// and runs the aborted handlers to completion. Returns false on timeout.
// The deadline is a timer in the context, not run_one_for: Asio caps each
// run_one_for wait at one second, which woke every idle session once a
// second (a thousand wake-ups a second on a sink with a thousand volumes).
template <typename Cancel>
bool RunFor(asio::io_context& ctx, const bool* done, std::chrono::milliseconds timeout,
            Cancel cancel) {
  ctx.restart();
  bool timed_out = false;
  bool timer_done = false;
  asio::steady_timer timer(ctx, timeout);
  timer.async_wait([&](const error_code& ec) {
    timer_done = true;
    if (ec || *done) return;
    timed_out = true;
    cancel();
  });
  const auto run_until = [&](const bool* flag) {
    while (!*flag) {
      ctx.run_one();
      if (ctx.stopped()) ctx.restart();
    }
  };
  run_until(done);
  timer.cancel();
  run_until(&timer_done);  // the timer's handler refers to this frame
  return !timed_out;
}

// A link over a byte stream: a TCP or Unix socket (TLS: tls_link.h).
template <typename Stream>
class StreamLink final : public Link {
 public:
  StreamLink(std::unique_ptr<asio::io_context> ctx, Stream stream, std::string peer,
             LinkOptions options)
      : ctx_(std::move(ctx)),
        stream_(std::move(stream)),
        peer_(std::move(peer)),
        options_(std::move(options)),
        buf_(kBufSize) {}

  ~StreamLink() override {
    error_code ignored;
    stream_.close(ignored);
  }

  std::optional<PeerCredentials> credentials() const override {
    if constexpr (std::is_same_v<Stream, asio::local::stream_protocol::socket>) {
      ucred c{};
      socklen_t len = sizeof c;
      if (getsockopt(const_cast<Stream&>(stream_).native_handle(), SOL_SOCKET, SO_PEERCRED, &c,
                     &len) == 0) {
        return PeerCredentials{c.pid, c.uid, c.gid};
      }
    }
    return std::nullopt;
  }

  Status Send(FrameType type, std::string_view body, std::span<const char> payload) override {
    const auto header = EncodeHeader(type, body, static_cast<uint32_t>(payload.size()));
    return WriteAll(std::array<asio::const_buffer, 3>{
        asio::buffer(header.data(), header.size()), asio::buffer(body.data(), body.size()),
        asio::buffer(payload.data(), payload.size())});
  }

  Status SendEncoded(std::string_view frame) override {
    return WriteAll(asio::buffer(frame.data(), frame.size()));
  }

  StatusOr<Frame> Receive(std::chrono::milliseconds timeout) override {
    if (closed_) return Aborted(fmt::format("link to {} is closed", peer_));
    if (end_ == begin_) {
      // Wait for the first byte of the next frame with the caller's timeout.
      Status st = Fill(1, timeout, /*first=*/true);
      if (!st.ok()) return st;
    }
    Source src(*this);
    auto f = ReadFrame(src);
    if (!f.ok() && f.status().code() == Code::kDataLoss) closed_ = true;
    return f;
  }

  void Close() override {
    closed_ = true;
    asio::post(*ctx_, [this] {
      error_code ignored;
      stream_.shutdown(asio::socket_base::shutdown_both, ignored);
      stream_.close(ignored);
    });
    // If no thread runs the context now, close directly on the next call.
  }

  const std::string& peer() const override { return peer_; }

 private:
  // Small on purpose: what a read pulls in past the frame's body is copied
  // once more out of this buffer, so a large payload should find it nearly
  // empty and go straight from the socket into the frame (ReadExact). 16
  // KiB still carries a few hundred small frames (zero records) per read.
  static constexpr size_t kBufSize = 16 * 1024;

  struct Source final : ByteSource {
    explicit Source(StreamLink& l) : link(l) {}
    Status ReadExact(std::span<char> out) override { return link.ReadExact(out); }
    StreamLink& link;
  };

  // Writes all of `bufs`, or breaks the link.
  template <typename Buffers>
  Status WriteAll(const Buffers& bufs) {
    if (closed_) return Aborted(fmt::format("link to {} is closed", peer_));
    bool done = false;
    error_code result;
    asio::async_write(stream_, bufs, [&](const error_code& ec, size_t) {
      result = ec;
      done = true;
    });
    if (!RunFor(*ctx_, &done, options_.stall_timeout, [&] { CancelSocket(); })) {
      closed_ = true;
      return Aborted(
          fmt::format("send to {} stalled for {} ms", peer_, options_.stall_timeout.count()));
    }
    if (result) {
      closed_ = true;
      return FromAsio(result, fmt::format("send to {}", peer_));
    }
    return OkStatus();
  }

  // A read that failed mid-stream breaks the link.
  Status ReceiveError(const error_code& result) {
    closed_ = true;
    if (IsEof(result)) {
      return DataLoss(fmt::format("truncated frame: {} closed the link mid-frame", peer_));
    }
    return FromAsio(result, fmt::format("receive from {}", peer_));
  }

  void CancelSocket() {
    error_code ignored;
    stream_.cancel(ignored);
  }

  // Reads until the buffer holds at least `want` bytes (want <= kBufSize).
  Status Fill(size_t want, std::chrono::milliseconds timeout, bool first) {
    if (begin_ > 0) {
      std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
      end_ -= begin_;
      begin_ = 0;
    }
    while (end_ < want) {
      bool done = false;
      error_code result;
      size_t got = 0;
      stream_.async_read_some(asio::buffer(buf_.data() + end_, buf_.size() - end_),
                              [&](const error_code& ec, size_t n) {
                                result = ec;
                                got = n;
                                done = true;
                              });
      if (!RunFor(*ctx_, &done, timeout, [&] { CancelSocket(); })) {
        end_ += got;
        if (first && end_ == 0) {
          return Unavailable(fmt::format("no frame from {} within {} ms", peer_, timeout.count()));
        }
        closed_ = true;
        return Aborted(fmt::format("{} stalled mid-frame for {} ms", peer_, timeout.count()));
      }
      end_ += got;
      if (result) {
        if (IsEof(result) && end_ == 0 && first) {
          closed_ = true;
          return Aborted(fmt::format("{} closed the link", peer_));
        }
        return ReceiveError(result);
      }
      first = false;
      timeout = options_.stall_timeout;
    }
    return OkStatus();
  }

  Status ReadExact(std::span<char> out) {
    size_t pos = 0;
    while (pos < out.size()) {
      if (begin_ == end_) {
        const size_t left = out.size() - pos;
        if (left >= kBufSize) {
          // Large payloads go straight to their destination.
          bool done = false;
          error_code result;
          size_t got = 0;
          asio::async_read(stream_, asio::buffer(out.data() + pos, left),
                           [&](const error_code& ec, size_t n) {
                             result = ec;
                             got = n;
                             done = true;
                           });
          if (!RunFor(*ctx_, &done, options_.stall_timeout, [&] { CancelSocket(); })) {
            closed_ = true;
            return Aborted(fmt::format("{} stalled mid-frame", peer_));
          }
          if (result) return ReceiveError(result);
          pos += got;
          continue;
        }
        RETURN_IF_ERROR(Fill(1, options_.stall_timeout, /*first=*/false));
      }
      const size_t n = std::min(out.size() - pos, end_ - begin_);
      std::memcpy(out.data() + pos, buf_.data() + begin_, n);
      begin_ += n;
      pos += n;
    }
    return OkStatus();
  }

  std::unique_ptr<asio::io_context> ctx_;
  Stream stream_;
  std::string peer_;
  LinkOptions options_;
  std::atomic<bool> closed_{false};
  std::vector<char> buf_;
  size_t begin_ = 0, end_ = 0;
};

template <typename Protocol>
class SocketListener final : public Listener {
 public:
  SocketListener(std::unique_ptr<asio::io_context> ctx, typename Protocol::acceptor acceptor,
                 LinkOptions options, std::string name)
      : ctx_(std::move(ctx)),
        acceptor_(std::move(acceptor)),
        options_(options),
        name_(std::move(name)) {}

  StatusOr<std::unique_ptr<Link>> Accept() override {
    auto link_ctx = std::make_unique<asio::io_context>();
    typename Protocol::socket sock(*link_ctx);
    bool done = false;
    error_code result;
    acceptor_.async_accept(sock, [&](const error_code& ec) {
      result = ec;
      done = true;
    });
    ctx_->restart();
    while (!done) ctx_->run_one();
    if (result) return FromAsio(result, fmt::format("accept on {}", name_));
    std::string peer = name_;
    if constexpr (std::is_same_v<Protocol, asio::ip::tcp>) {
      error_code ec;
      auto ep = sock.remote_endpoint(ec);
      if (!ec) peer = fmt::format("{}:{}", ep.address().to_string(), ep.port());
      sock.set_option(asio::ip::tcp::no_delay(true), ec);
      sock.set_option(asio::socket_base::keep_alive(true), ec);
    }
    if constexpr (std::is_same_v<Protocol, asio::ip::tcp>) {
      if (options_.tls) {
        error_code ec;
        const int fd = sock.release(ec);
        if (ec) return FromAsio(ec, fmt::format("accept on {}", name_));
        return AcceptTls(fd, peer, options_);
      }
    }
    return std::unique_ptr<Link>(new StreamLink<typename Protocol::socket>(
        std::move(link_ctx), std::move(sock), peer, options_));
  }

  void Close() override {
    asio::post(*ctx_, [this] {
      error_code ignored;
      acceptor_.close(ignored);
    });
  }

  uint16_t port() const override {
    if constexpr (std::is_same_v<Protocol, asio::ip::tcp>) {
      error_code ec;
      return acceptor_.local_endpoint(ec).port();
    }
    return 0;
  }

 private:
  std::unique_ptr<asio::io_context> ctx_;
  typename Protocol::acceptor acceptor_;
  LinkOptions options_;
  std::string name_;
};

}  // namespace

StatusOr<std::pair<std::string, uint16_t>> ParseHostPort(const std::string& text) {
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return InvalidArgument(fmt::format("'{}' is not host:port (for example 127.0.0.1:7410)", text));
  }
  std::string host = text.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  unsigned port = 0;
  const char* b = text.data() + colon + 1;
  const char* e = text.data() + text.size();
  auto [p, ec] = std::from_chars(b, e, port);
  if (ec != std::errc() || p != e || port > 65535) {
    return InvalidArgument(fmt::format("'{}' has no valid port (0..65535)", text));
  }
  return std::make_pair(host, static_cast<uint16_t>(port));
}

StatusOr<std::unique_ptr<Link>> ConnectTcp(const std::string& host, uint16_t port,
                                           const LinkOptions& options) {
  auto ctx = std::make_unique<asio::io_context>();
  const std::string peer = fmt::format("{}:{}", host, port);
  // Held until the handshake ends (this function returns).
  std::optional<HandshakeSlots::Slot> slot;
  if (options.tls) {
    slot.emplace(
        HandshakeSlots::Get().Acquire(peer, options.max_handshakes_per_peer,
                                      std::chrono::steady_clock::now() + options.connect_timeout));
    if (!slot->held()) {
      return Unavailable(fmt::format(
          "{} TLS handshakes of this process with {} are in flight; none finished within {} ms",
          options.max_handshakes_per_peer, peer, options.connect_timeout.count()));
    }
  }
  error_code ec;
  asio::ip::tcp::resolver resolver(*ctx);
  auto endpoints = resolver.resolve(host, std::to_string(port), ec);
  if (ec) return Unavailable(fmt::format("cannot resolve {}: {}", host, ec.message()));
  asio::ip::tcp::socket sock(*ctx);
  bool done = false;
  error_code result;
  asio::async_connect(sock, endpoints, [&](const error_code& e, const asio::ip::tcp::endpoint&) {
    result = e;
    done = true;
  });
  if (!RunFor(*ctx, &done, options.connect_timeout, [&] { sock.close(ec); })) {
    return Unavailable(
        fmt::format("connect to {} timed out after {} ms", peer, options.connect_timeout.count()));
  }
  if (result) return FromAsio(result, fmt::format("connect to {}", peer));
  sock.set_option(asio::ip::tcp::no_delay(true), ec);
  sock.set_option(asio::socket_base::keep_alive(true), ec);
  if (!options.tls) {
    return std::unique_ptr<Link>(
        new StreamLink<asio::ip::tcp::socket>(std::move(ctx), std::move(sock), peer, options));
  }
  const int fd = sock.release(ec);
  if (ec) return FromAsio(ec, fmt::format("connect to {}", peer));
  return ConnectTls(fd, peer, options, options.peer_name.empty() ? host : options.peer_name);
}

StatusOr<std::unique_ptr<Link>> ConnectUnix(const std::string& path, const LinkOptions& options) {
  auto io = std::make_unique<asio::io_context>();
  asio::local::stream_protocol::socket sock(*io);
  error_code ec;
  sock.connect(asio::local::stream_protocol::endpoint(path), ec);
  if (ec) {
    if (ec == asio::error::not_found || ec == asio::error::connection_refused ||
        ec.value() == ENOENT) {
      return Unavailable(fmt::format("cairnd is not running at {} ({}): start it, or pass --socket",
                                     path, ec.message()));
    }
    if (ec == asio::error::access_denied || ec.value() == EACCES) {
      return PermissionDenied(
          fmt::format("may not connect to the control socket {}: run as root, cairnd's user or a "
                      "member of its [cairnd] control_group",
                      path));
    }
    return FromAsio(ec, fmt::format("connect to {}", path));
  }
  return std::unique_ptr<Link>(new StreamLink<asio::local::stream_protocol::socket>(
      std::move(io), std::move(sock), path, options));
}

StatusOr<std::unique_ptr<Listener>> Listener::ListenTcp(const std::string& host, uint16_t port,
                                                        const LinkOptions& options) {
  auto ctx = std::make_unique<asio::io_context>();
  error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec) return InvalidArgument(fmt::format("'{}' is not an IP address to listen on", host));
  asio::ip::tcp::acceptor acc(*ctx);
  asio::ip::tcp::endpoint ep(addr, port);
  acc.open(ep.protocol(), ec);
  if (!ec) acc.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acc.bind(ep, ec);
  if (!ec) acc.listen(asio::socket_base::max_listen_connections, ec);
  const std::string name = fmt::format("{}:{}", host, port);
  if (ec) return FromAsio(ec, fmt::format("listen on {}", name));
  return std::unique_ptr<Listener>(
      new SocketListener<asio::ip::tcp>(std::move(ctx), std::move(acc), options, name));
}

StatusOr<std::unique_ptr<Listener>> Listener::ListenUnix(const std::string& path,
                                                         const LinkOptions& options, uint32_t mode,
                                                         std::optional<uint32_t> group) {
  auto ctx = std::make_unique<asio::io_context>();
  error_code ec;
  if (std::filesystem::exists(path)) {
    // A live daemon answers; a stale file from a crash does not.
    asio::local::stream_protocol::socket probe(*ctx);
    probe.connect(asio::local::stream_protocol::endpoint(path), ec);
    if (!ec) {
      return FailedPrecondition(
          fmt::format("another process is serving the control socket {}: stop it first", path));
    }
    std::filesystem::remove(path, ec);
  }
  asio::local::stream_protocol::acceptor acc(*ctx);
  asio::local::stream_protocol::endpoint ep(path);
  acc.open(ep.protocol(), ec);
  if (!ec) acc.bind(ep, ec);
  if (ec) return FromAsio(ec, fmt::format("listen on {}", path));
  // Before the socket listens: nobody connects through wider permissions.
  if (group && ::chown(path.c_str(), static_cast<uid_t>(-1), *group) != 0) {
    return ErrnoStatus(-errno,
                       fmt::format("giving the control socket {} group id {}", path, *group));
  }
  if (::chmod(path.c_str(), mode) != 0) {
    return ErrnoStatus(-errno, fmt::format("setting the mode of the control socket {}", path));
  }
  acc.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return FromAsio(ec, fmt::format("listen on {}", path));
  return std::unique_ptr<Listener>(new SocketListener<asio::local::stream_protocol>(
      std::move(ctx), std::move(acc), options, path));
}

}  // namespace cairn
