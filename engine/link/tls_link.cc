#include "engine/link/tls_link.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <vector>

#include "engine/link/tls_impl.h"

namespace cairn {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// What one recv(2) may read ahead, and what one send(2) carries: about
// eight records.
constexpr size_t kBatch = 128 * 1024;
// Above this, the send buffer is given back after a frame: an idle link
// holds no batch.
constexpr size_t kKeptOut = 32 * 1024;

// OpenSSL's write side. Each record it makes is appended to the link's
// out buffer (the BIO's data); the link sends that buffer itself. Writes
// never block, so OpenSSL never waits to write.
int OutWrite(BIO* bio, const char* data, int len) {
  auto* out = static_cast<std::vector<char>*>(BIO_get_data(bio));
  out->insert(out->end(), data, data + len);
  return len;
}

long OutCtrl(BIO*, int cmd, long, void*) { return cmd == BIO_CTRL_FLUSH ? 1 : 0; }

int OutCreate(BIO* bio) {
  BIO_set_init(bio, 1);
  return 1;
}

const BIO_METHOD* OutMethod() {
  static BIO_METHOD* const method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_TYPE_SOURCE_SINK, "cairn link out");
    if (m != nullptr) {
      BIO_meth_set_write(m, OutWrite);
      BIO_meth_set_ctrl(m, OutCtrl);
      BIO_meth_set_create(m, OutCreate);
    }
    return m;
  }();
  return method;
}

// TLS alerts a peer sends when it refuses this end's certificate.
bool IsRefusal(int alert) {
  switch (alert) {
    case SSL_AD_BAD_CERTIFICATE:
    case SSL_AD_UNSUPPORTED_CERTIFICATE:
    case SSL_AD_CERTIFICATE_REVOKED:
    case SSL_AD_CERTIFICATE_EXPIRED:
    case SSL_AD_CERTIFICATE_UNKNOWN:
    case SSL_AD_UNKNOWN_CA:
    case SSL_AD_ACCESS_DENIED:
    case SSL_AD_CERTIFICATE_REQUIRED:
      return true;
    default:
      return false;
  }
}

class TlsLink final : public Link {
 public:
  // Takes `fd` and `ssl`.
  TlsLink(int fd, SSL* ssl, std::string peer, LinkOptions options)
      : fd_(fd), ssl_(ssl), peer_(std::move(peer)), options_(std::move(options)) {}

  ~TlsLink() override {
    SSL_free(ssl_);
    ::close(fd_);
  }

  // Sets the socket and OpenSSL up; kInternal if either refuses, which
  // every later call returns.
  Status Init() {
    handshake_ = SetUp();
    if (!handshake_.ok()) closed_ = true;
    return handshake_;
  }

  void SetHandshakePending() { handshake_pending_ = handshake_.ok(); }

  Status Handshake() override {
    if (!handshake_pending_) return handshake_;
    handshake_pending_ = false;
    SSL_set_accept_state(ssl_);
    handshake_ = RunHandshake(options_.handshake_timeout, "");
    return handshake_;
  }

  Status ClientHandshake(const std::string& name) {
    RETURN_IF_ERROR(handshake_);
    in6_addr ip;
    const bool is_ip = ::inet_pton(AF_INET, name.c_str(), &ip) == 1 ||
                       ::inet_pton(AF_INET6, name.c_str(), &ip) == 1;
    const int set = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_), name.c_str())
                          : SSL_set1_host(ssl_, name.c_str());
    if (set != 1) return InvalidArgument(fmt::format("'{}' is not a name TLS can check", name));
    SSL_set_connect_state(ssl_);
    handshake_ = RunHandshake(options_.connect_timeout, name);
    return handshake_;
  }

  const std::vector<std::string>& peer_names() const override { return peer_names_; }

  Status Send(FrameType type, std::string_view body, std::span<const char> payload) override {
    RETURN_IF_ERROR(Handshake());
    // The header and the body make one small record; the payload starts a
    // record of its own, so it is not copied to join them.
    const auto header = EncodeHeader(type, body, static_cast<uint32_t>(payload.size()));
    head_.assign(header.begin(), header.end());
    head_.insert(head_.end(), body.begin(), body.end());
    out_.reserve(std::min(kBatch, head_.size() + payload.size()) + 1024);
    Status st = Encrypt(head_);
    if (st.ok()) st = Encrypt(payload);
    if (st.ok()) st = SendError(Flush(options_.stall_timeout));
    if (out_.capacity() > kKeptOut) std::vector<char>().swap(out_);
    return st;
  }

  Status SendEncoded(std::string_view frame) override {
    RETURN_IF_ERROR(Handshake());
    Status st = Encrypt(frame);
    if (st.ok()) st = SendError(Flush(options_.stall_timeout));
    if (out_.capacity() > kKeptOut) std::vector<char>().swap(out_);
    return st;
  }

  StatusOr<Frame> Receive(milliseconds timeout) override {
    RETURN_IF_ERROR(Handshake());
    // The next frame's first byte, within the caller's timeout; a peek
    // takes nothing from the stream.
    char first;
    const Result r = Drive([&] { return SSL_peek(ssl_, &first, 1); }, timeout);
    if (r.end == End::kTimedOut) {
      return Unavailable(fmt::format("no frame from {} within {} ms", peer_, timeout.count()));
    }
    if (r.end == End::kEof) {
      closed_ = true;
      return Aborted(fmt::format("{} closed the link", peer_));
    }
    if (r.end != End::kDone) return ReceiveError(r);
    Source src(*this);
    auto f = ReadFrame(src);
    if (!f.ok() && f.status().code() == Code::kDataLoss) closed_ = true;
    return f;
  }

  void Close() override {
    closed_ = true;
    // Wakes a poll(2) of the thread using the link; the descriptor itself
    // stays open, so its number is not reused under that thread.
    ::shutdown(fd_, SHUT_RDWR);
  }

  const std::string& peer() const override { return peer_; }

 private:
  struct Source final : ByteSource {
    explicit Source(TlsLink& l) : link(l) {}
    Status ReadExact(std::span<char> out) override { return link.ReadExact(out); }
    TlsLink& link;
  };

  Status SetUp() {
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags < 0 || ::fcntl(fd_, F_SETFL, flags | O_NONBLOCK) < 0) {
      return ErrnoStatus(-errno, fmt::format("making the socket to {} non-blocking", peer_));
    }
    const BIO_METHOD* method = OutMethod();
    BIO* in = BIO_new_socket(fd_, BIO_NOCLOSE);
    BIO* out = method == nullptr ? nullptr : BIO_new(method);
    if (ssl_ == nullptr || in == nullptr || out == nullptr) {
      BIO_free(in);
      BIO_free(out);
      return Internal(fmt::format("OpenSSL could not set up TLS with {}", peer_));
    }
    BIO_set_data(out, &out_);
    SSL_set_bio(ssl_, in, out);
    SSL_set_read_ahead(ssl_, 1);
    SSL_set_default_read_buffer_len(ssl_, kBatch);
    // An idle link gives its record buffers back.
    SSL_set_mode(ssl_, SSL_MODE_RELEASE_BUFFERS);
    return OkStatus();
  }

  // How an OpenSSL call (or a send) ended.
  enum class End { kDone, kTimedOut, kClosed, kEof, kSocket, kTls, kRefused };
  struct Result {
    Result(End e = End::kDone, int count = 0, std::string why = {})
        : end(e), n(count), detail(std::move(why)) {}
    End end;
    int n;               // kDone: what the call returned
    std::string detail;  // kSocket, kTls, kRefused: why
  };

  // Runs `op` (SSL_read, SSL_write, SSL_do_handshake...) until it succeeds
  // or fails. Before each wait for the peer, sends what the call wrote.
  // Each wait lasts at most `idle`, and ends by `deadline`.
  template <typename Op>
  Result Drive(Op op, milliseconds idle, Clock::time_point deadline = Clock::time_point::max()) {
    while (true) {
      if (closed_) return {End::kClosed};
      ERR_clear_error();
      errno = 0;
      const int r = op();
      if (r > 0) return {End::kDone, r};
      const int err = SSL_get_error(ssl_, r);
      if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE) return Failure(err);
      if (Result f = Flush(idle); f.end != End::kDone) return f;
      const End w = WaitFor(err == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, idle, deadline);
      if (w != End::kDone) return {w};
    }
  }

  Result Failure(int err) {
    const int sys = errno;
    if (closed_) return {End::kClosed};
    if (err == SSL_ERROR_ZERO_RETURN) return {End::kEof};
    if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
      if (sys == 0) return {End::kEof};
      return {End::kSocket, 0, std::strerror(sys)};
    }
    const unsigned long e = ERR_peek_last_error();
    const char* reason = ERR_reason_error_string(e);
    Result out{End::kTls, 0, reason != nullptr ? reason : "no detail from OpenSSL"};
    const int code = ERR_GET_REASON(e);
    if (ERR_GET_LIB(e) == ERR_LIB_SSL && code > SSL_AD_REASON_OFFSET &&
        IsRefusal(code - SSL_AD_REASON_OFFSET)) {
      out.end = End::kRefused;
    }
    const long verify = SSL_get_verify_result(ssl_);
    if (verify != X509_V_OK)
      out.detail += fmt::format(": {}", X509_verify_cert_error_string(verify));
    ERR_clear_error();
    return out;
  }

  // Waits until the socket is ready for `events`: kDone, kTimedOut after
  // `idle` or at `deadline`, kClosed if Close was called.
  End WaitFor(short events, milliseconds idle, Clock::time_point deadline) {
    if (deadline != Clock::time_point::max()) {
      const auto left = std::chrono::ceil<milliseconds>(deadline - Clock::now());
      idle = std::min(idle, std::max(left, milliseconds(0)));
    }
    pollfd p{fd_, events, 0};
    const int timeout = static_cast<int>(std::min<int64_t>(idle.count(), INT_MAX));
    int n;
    do {
      n = ::poll(&p, 1, timeout);
    } while (n < 0 && errno == EINTR);
    if (closed_) return End::kClosed;
    return n == 0 ? End::kTimedOut : End::kDone;  // an error: the next call sees it
  }

  // Sends out_, waiting at most `idle` at a time for the peer to drain
  // the socket. kDone empties out_.
  Result Flush(milliseconds idle) {
    size_t sent = 0;
    while (sent < out_.size()) {
      const ssize_t n = ::send(fd_, out_.data() + sent, out_.size() - sent, MSG_NOSIGNAL);
      if (n > 0) {
        sent += static_cast<size_t>(n);
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (const End w = WaitFor(POLLOUT, idle, Clock::time_point::max()); w != End::kDone) {
          return {w};
        }
      } else if (n == 0 || errno != EINTR) {
        return {closed_ ? End::kClosed : End::kSocket, 0, std::strerror(n == 0 ? EPIPE : errno)};
      }
    }
    out_.clear();
    return {};
  }

  // Encrypts `data` into out_, sending each full batch; the caller sends
  // the rest.
  Status Encrypt(std::span<const char> data) {
    if (closed_) return Aborted(fmt::format("link to {} is closed", peer_));
    while (!data.empty()) {
      const size_t n = std::min(data.size(), kBatch);
      const Result r = Drive([&] { return SSL_write(ssl_, data.data(), static_cast<int>(n)); },
                             options_.stall_timeout);
      RETURN_IF_ERROR(SendError(r));
      data = data.subspan(n);  // without partial writes, SSL_write took all n
      if (out_.size() >= kBatch) RETURN_IF_ERROR(SendError(Flush(options_.stall_timeout)));
    }
    return OkStatus();
  }

  Status SendError(const Result& r) {
    if (r.end == End::kDone) return OkStatus();
    closed_ = true;
    switch (r.end) {
      case End::kTimedOut:
        return Aborted(
            fmt::format("send to {} stalled for {} ms", peer_, options_.stall_timeout.count()));
      case End::kClosed:
        return Aborted(fmt::format("link to {} is closed", peer_));
      case End::kRefused:
        return PermissionDenied(
            fmt::format("{} refused this end's certificate ({})", peer_, r.detail));
      default:
        return Aborted(fmt::format("send to {}: connection closed ({})", peer_,
                                   r.detail.empty() ? "end of stream" : r.detail));
    }
  }

  // A read that failed mid-stream breaks the link. Bytes changed on the
  // way fail TLS's record check before any frame check sees them: data
  // loss, as a frame that fails its checksum would be.
  Status ReceiveError(const Result& r) {
    closed_ = true;
    switch (r.end) {
      case End::kTimedOut:
        return Aborted(
            fmt::format("{} stalled mid-frame for {} ms", peer_, options_.stall_timeout.count()));
      case End::kClosed:
        return Aborted(fmt::format("link to {} is closed", peer_));
      case End::kEof:
        return DataLoss(fmt::format("truncated frame: {} closed the link mid-frame", peer_));
      case End::kSocket:
        return Aborted(fmt::format("receive from {}: connection closed ({})", peer_, r.detail));
      case End::kRefused:
        return PermissionDenied(
            fmt::format("{} refused this end's certificate ({})", peer_, r.detail));
      default:
        return DataLoss(
            fmt::format("a TLS record from {} failed its integrity check ({})", peer_, r.detail));
    }
  }

  Status ReadExact(std::span<char> out) {
    size_t pos = 0;
    while (pos < out.size()) {
      const int want = static_cast<int>(std::min<size_t>(out.size() - pos, INT_MAX));
      const Result r =
          Drive([&] { return SSL_read(ssl_, out.data() + pos, want); }, options_.stall_timeout);
      if (r.end != End::kDone) return ReceiveError(r);
      pos += static_cast<size_t>(r.n);
    }
    return OkStatus();
  }

  // `name`: the name the server must carry (client side); empty on the
  // server's.
  Status RunHandshake(milliseconds timeout, const std::string& name) {
    const Result r = Drive([&] { return SSL_do_handshake(ssl_); }, timeout, Clock::now() + timeout);
    if (r.end == End::kDone) {
      const Result sent = Flush(timeout);  // the client's Finished
      if (sent.end != End::kDone) return HandshakeError(sent, timeout, name);
      return TakePeerNames();
    }
    (void)Flush(milliseconds(0));  // the alert that says why, if it fits
    return HandshakeError(r, timeout, name);
  }

  Status HandshakeError(const Result& r, milliseconds timeout, const std::string& name) {
    closed_ = true;
    if (r.end == End::kTimedOut) {
      return Aborted(
          fmt::format("{} did not finish its TLS handshake within {} ms", peer_, timeout.count()));
    }
    if (r.end == End::kClosed) return Aborted(fmt::format("link to {} is closed", peer_));
    const std::string why = r.end == End::kEof ? "it closed the connection" : r.detail;
    if (!name.empty()) {
      return PermissionDenied(fmt::format(
          "TLS handshake with {} failed ({}): is it a Cairn sink, with a certificate from "
          "[tls] ca that names {}?",
          peer_, why, name));
    }
    return PermissionDenied(
        fmt::format("TLS handshake with {} failed ({}): is it a Cairn source, with a "
                    "certificate from [tls] ca?",
                    peer_, why));
  }

  Status TakePeerNames() {
    X509* cert = SSL_get1_peer_certificate(ssl_);
    if (cert == nullptr) {
      closed_ = true;
      return PermissionDenied(fmt::format("{} presented no certificate", peer_));
    }
    peer_names_ = CertificateNames(cert);
    X509_free(cert);
    if (peer_names_.empty()) {
      closed_ = true;
      return PermissionDenied(fmt::format("the certificate of {} names no one", peer_));
    }
    return OkStatus();
  }

  const int fd_;
  SSL* const ssl_;
  const std::string peer_;
  const LinkOptions options_;
  bool handshake_pending_ = false;
  Status handshake_;
  std::vector<std::string> peer_names_;
  std::atomic<bool> closed_{false};
  std::vector<char> out_;   // records made, not yet sent
  std::vector<char> head_;  // a frame's header and body
};

std::unique_ptr<TlsLink> MakeLink(int fd, std::string peer, const LinkOptions& options) {
  auto link = std::make_unique<TlsLink>(fd, SSL_new(options.tls->impl().ctx.get()), std::move(peer),
                                        options);
  (void)link->Init();  // kept as the link's handshake status
  return link;
}

}  // namespace

std::unique_ptr<Link> AcceptTls(int fd, std::string peer, const LinkOptions& options) {
  auto link = MakeLink(fd, std::move(peer), options);
  link->SetHandshakePending();  // a failed set-up is the session's failed handshake
  return link;
}

StatusOr<std::unique_ptr<Link>> ConnectTls(int fd, std::string peer, const LinkOptions& options,
                                           const std::string& name) {
  auto link = MakeLink(fd, std::move(peer), options);
  RETURN_IF_ERROR(link->ClientHandshake(name));
  return std::unique_ptr<Link>(std::move(link));
}

}  // namespace cairn
