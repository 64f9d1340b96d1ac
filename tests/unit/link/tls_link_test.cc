// Mutual TLS on TCP links (engine/link/tls.h, tls_link.cc) and the limits
// LinkServer puts on peers before they authenticate, over loopback with
// certificates made by deploy/cairn-certs. A peer that is not
// authenticated never gets a frame read.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine/link/handshake_slots.h"
#include "engine/link/link_server.h"
#include "engine/link/tcp_link.h"
#include "engine/link/tls.h"
#include "tests/unit/link/test_certs.h"

namespace cairn {
namespace {

using namespace std::chrono_literals;
using testing::TestCerts;

LinkOptions Tls(const std::string& name) {
  LinkOptions o;
  o.tls = TestCerts::Get().Context(name);
  return o;
}

// The server's end of one connection: accepted and its handshake run, on
// a thread of its own as LinkServer does.
struct ServerEnd {
  explicit ServerEnd(const LinkOptions& options) {
    auto l = Listener::ListenTcp("127.0.0.1", 0, options);
    EXPECT_TRUE(l.ok()) << l.status().ToString();
    listener = std::move(*l);
    thread = std::thread([this] {
      accepted = listener->Accept();
      if (accepted.ok()) handshake = (*accepted)->Handshake();
    });
  }
  ~ServerEnd() { Join(); }
  void Join() {
    if (thread.joinable()) thread.join();
  }
  uint16_t port() const { return listener->port(); }

  std::unique_ptr<Listener> listener;
  StatusOr<std::unique_ptr<Link>> accepted = Internal("not accepted");
  Status handshake = Internal("no handshake");
  std::thread thread;
};

TEST(TlsLinkTest, FramesCrossAndEachEndKnowsTheOther) {
  ServerEnd server(Tls("site-b"));
  auto client = ConnectTcp("127.0.0.1", server.port(), Tls("site-a"));
  server.Join();
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  ASSERT_TRUE(server.handshake.ok()) << server.handshake.ToString();
  Link& s = **server.accepted;
  EXPECT_EQ(s.peer_names(), (std::vector<std::string>{"site-a", "127.0.0.1", "localhost"}));
  EXPECT_EQ((*client)->peer_names().front(), "site-b");

  const std::string payload(300 * 1024, 'x');  // many TLS records
  ASSERT_TRUE((*client)->Send(FrameType::kHello, "hello", payload).ok());
  auto got = s.Receive(5s);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->body, "hello");
  EXPECT_EQ(std::string(got->payload.begin(), got->payload.end()), payload);
  ASSERT_TRUE(s.Send(FrameType::kHelloReply, "reply", {}).ok());
  auto back = (*client)->Receive(5s);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->body, "reply");
}

TEST(TlsLinkTest, PlaintextPeerIsRefusedAndItsFrameNeverRead) {
  ServerEnd server(Tls("site-b"));
  auto client = ConnectTcp("127.0.0.1", server.port());  // no TLS
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  (void)(*client)->Send(FrameType::kHello, "forged hello", {});
  server.Join();
  EXPECT_EQ(server.handshake.code(), Code::kPermissionDenied) << server.handshake.ToString();
  ASSERT_TRUE(server.accepted.ok());
  EXPECT_TRUE((*server.accepted)->peer_names().empty());
  auto f = (*server.accepted)->Receive(1s);
  EXPECT_EQ(f.status().code(), Code::kPermissionDenied) << "a frame was read: " << f.ok();
}

TEST(TlsLinkTest, CertificateOfAnotherCaIsRefusedByBothEnds) {
  ServerEnd server(Tls("site-b"));
  auto client = ConnectTcp("127.0.0.1", server.port(), Tls("other/site-a"));
  server.Join();
  EXPECT_EQ(client.status().code(), Code::kPermissionDenied) << client.status().ToString();
  EXPECT_EQ(server.handshake.code(), Code::kPermissionDenied) << server.handshake.ToString();
}

TEST(TlsLinkTest, ClientCertificateOfAnotherCaIsRefusedBeforeAnyFrame) {
  // The client trusts the server's CA, but its own certificate is not
  // from it: the server refuses in the handshake.
  const TlsFiles own = TestCerts::Get().Files("other/site-a");
  auto ctx = TlsContext::Load({TestCerts::Get().Files("site-a").ca, own.cert, own.key});
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  LinkOptions o;
  o.tls = *ctx;
  ServerEnd server(Tls("site-b"));
  auto client = ConnectTcp("127.0.0.1", server.port(), o);
  if (client.ok()) (void)(*client)->Send(FrameType::kHello, "hello", {});
  server.Join();
  EXPECT_EQ(server.handshake.code(), Code::kPermissionDenied) << server.handshake.ToString();
  ASSERT_TRUE(server.accepted.ok());
  EXPECT_FALSE((*server.accepted)->Receive(1s).ok());
  if (client.ok()) {
    EXPECT_FALSE((*client)->Receive(5s).ok()) << "the refused client got a frame";
  }
}

TEST(TlsLinkTest, ServerMustCarryTheExpectedName) {
  {
    ServerEnd server(Tls("site-b"));
    LinkOptions o = Tls("site-a");
    o.peer_name = "site-c";
    auto client = ConnectTcp("127.0.0.1", server.port(), o);
    EXPECT_EQ(client.status().code(), Code::kPermissionDenied) << client.status().ToString();
  }
  ServerEnd server(Tls("site-b"));
  LinkOptions o = Tls("site-a");
  o.peer_name = "site-b";
  auto client = ConnectTcp("127.0.0.1", server.port(), o);
  EXPECT_TRUE(client.ok()) << client.status().ToString();
}

// Two ends of one TLS connection, both handshakes done.
struct Pair {
  std::unique_ptr<Link> client, server;
};

Pair Connect(LinkOptions client_options = Tls("site-a")) {
  ServerEnd server(Tls("site-b"));
  auto client = ConnectTcp("127.0.0.1", server.port(), client_options);
  server.Join();
  EXPECT_TRUE(client.ok()) << client.status().ToString();
  EXPECT_TRUE(server.handshake.ok()) << server.handshake.ToString();
  if (!client.ok() || !server.accepted.ok()) return {};
  return {std::move(*client), std::move(*server.accepted)};
}

TEST(TlsLinkTest, FramesOfEverySizeCrossBothWaysIntact) {
  Pair p = Connect();
  ASSERT_TRUE(p.client && p.server);
  // Around a record (16 KiB), around a send's batch (128 KiB), and a full
  // sync's record with an odd tail.
  const std::vector<size_t> sizes = {0,
                                     1,
                                     16 * 1024 - 1,
                                     16 * 1024,
                                     16 * 1024 + 1,
                                     128 * 1024 - 1,
                                     128 * 1024,
                                     128 * 1024 + 7,
                                     (4u << 20) + 3};
  std::mt19937 rng(7);
  std::thread echo([&] {
    for (size_t i = 0; i < sizes.size(); ++i) {
      auto f = p.server->Receive(10s);
      if (!f.ok()) return ADD_FAILURE() << "server: " << f.status().ToString();
      if (!p.server->Send(FrameType::kHelloReply, f->body, f->payload).ok()) return;
    }
  });
  for (size_t n : sizes) {
    std::vector<char> payload(n);
    for (char& c : payload) c = static_cast<char>(rng());
    const std::string body = fmt::format("frame of {} bytes", n);
    ASSERT_TRUE(p.client->Send(FrameType::kHello, body, payload).ok()) << n;
    auto back = p.client->Receive(10s);
    ASSERT_TRUE(back.ok()) << n << ": " << back.status().ToString();
    EXPECT_EQ(back->type, FrameType::kHelloReply);
    EXPECT_EQ(back->body, body);
    EXPECT_TRUE(
        std::equal(payload.begin(), payload.end(), back->payload.begin(), back->payload.end()))
        << "the payload of " << n << " bytes came back changed";
  }
  echo.join();
}

TEST(TlsLinkTest, ReceiveTimesOutAndTheLinkStaysUsable) {
  Pair p = Connect();
  ASSERT_TRUE(p.client && p.server);
  auto none = p.server->Receive(50ms);
  EXPECT_EQ(none.status().code(), Code::kUnavailable) << none.status().ToString();
  EXPECT_THAT(none.status().message(), ::testing::HasSubstr("no frame from"));
  ASSERT_TRUE(p.client->Send(FrameType::kHello, "late", {}).ok());
  auto f = p.server->Receive(10s);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->body, "late");
}

TEST(TlsLinkTest, CloseFromAnotherThreadEndsABlockedReceive) {
  Pair p = Connect();
  ASSERT_TRUE(p.client && p.server);
  Status got = Internal("Receive never returned");
  const auto t0 = std::chrono::steady_clock::now();
  std::thread receiver([&] { got = p.server->Receive(60s).status(); });
  p.server->Close();
  receiver.join();
  EXPECT_EQ(got.code(), Code::kAborted) << got.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 30s) << "Close did not wake the Receive";
  EXPECT_EQ(p.server->Send(FrameType::kHello, "after close", {}).code(), Code::kAborted);
}

TEST(TlsLinkTest, APeerThatStopsReadingStallsTheSenderWithinItsTimeout) {
  LinkOptions o = Tls("site-a");
  o.stall_timeout = 300ms;
  Pair p = Connect(o);
  ASSERT_TRUE(p.client && p.server);
  const std::vector<char> payload(4u << 20, 'x');
  Status st;
  int sent = 0;
  // The server never reads: the socket buffers fill, then a Send waits
  // out its stall timeout.
  for (; sent < 256 && st.ok(); ++sent) st = p.client->Send(FrameType::kRecord, "", payload);
  EXPECT_EQ(st.code(), Code::kAborted) << "after " << sent << " frames: " << st.ToString();
  EXPECT_THAT(st.message(), ::testing::HasSubstr("stalled for 300 ms"));
}

TEST(TlsLinkTest, APeerClosingMidFrameIsATruncatedFrame) {
  Pair p = Connect();
  ASSERT_TRUE(p.client && p.server);
  const std::vector<char> payload(100 * 1024, 'y');
  const std::string frame = EncodeFrame(FrameType::kRecord, "body", payload);
  ASSERT_TRUE(p.client->SendEncoded(std::string_view(frame).substr(0, frame.size() / 2)).ok());
  p.client.reset();  // closes the socket, as a killed process would
  auto f = p.server->Receive(10s);
  EXPECT_EQ(f.status().code(), Code::kDataLoss) << f.status().ToString();
  EXPECT_THAT(f.status().message(), ::testing::HasSubstr("truncated frame"));
}

// A TCP relay from a client to 127.0.0.1:`to` that can flip one bit of
// what the client sends, as a damaged network path would.
class FlippingRelay {
 public:
  explicit FlippingRelay(uint16_t to) {
    listen_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    EXPECT_EQ(::bind(listen_, reinterpret_cast<sockaddr*>(&a), len), 0);
    EXPECT_EQ(::listen(listen_, 1), 0);
    EXPECT_EQ(::getsockname(listen_, reinterpret_cast<sockaddr*>(&a), &len), 0);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this, to] { Run(to); });
  }
  ~FlippingRelay() {
    stop_ = true;
    ::shutdown(listen_, SHUT_RDWR);
    thread_.join();
    ::close(listen_);
  }
  uint16_t port() const { return port_; }
  // Flips the lowest bit of the client's byte `ahead` bytes from now.
  void FlipAhead(size_t ahead) { flip_at_ = up_ + ahead; }
  bool flipped() const { return flipped_; }

 private:
  void Run(uint16_t to) {
    const int c = ::accept(listen_, nullptr, nullptr);
    if (c < 0) return;
    const int s = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(to);
    if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) Relay(c, s);
    ::close(c);
    ::close(s);
  }
  void Relay(int c, int s) {
    std::vector<char> buf(64 * 1024);
    pollfd fds[2] = {{c, POLLIN, 0}, {s, POLLIN, 0}};
    while (!stop_) {
      if (::poll(fds, 2, 100) < 0) return;
      for (int i = 0; i < 2; ++i) {
        if (fds[i].revents == 0) continue;
        const ssize_t n = ::read(fds[i].fd, buf.data(), buf.size());
        if (n <= 0) return;
        if (i == 0) {
          const size_t at = flip_at_;
          if (at >= up_ && at < up_ + static_cast<size_t>(n)) {
            buf[at - up_] ^= 1;
            flipped_ = true;
          }
          up_ += static_cast<size_t>(n);
        }
        for (ssize_t done = 0; done < n;) {
          const ssize_t w = ::write(fds[1 - i].fd, buf.data() + done, n - done);
          if (w <= 0) return;
          done += w;
        }
      }
    }
  }

  int listen_ = -1;
  uint16_t port_ = 0;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<size_t> up_{0};
  std::atomic<size_t> flip_at_{SIZE_MAX};
  std::atomic<bool> flipped_{false};
};

TEST(TlsLinkTest, ABitFlippedOnTheWireFailsTheRecordCheck) {
  ServerEnd server(Tls("site-b"));
  FlippingRelay relay(server.port());
  auto client = ConnectTcp("127.0.0.1", relay.port(), Tls("site-a"));
  server.Join();
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  ASSERT_TRUE(server.handshake.ok()) << server.handshake.ToString();
  relay.FlipAhead(1000);  // inside the payload's first record
  const std::vector<char> payload(64 * 1024, 'z');
  ASSERT_TRUE((*client)->Send(FrameType::kRecord, "body", payload).ok());
  auto f = (*server.accepted)->Receive(10s);
  EXPECT_TRUE(relay.flipped());
  EXPECT_EQ(f.status().code(), Code::kDataLoss) << f.status().ToString();
  EXPECT_THAT(f.status().message(), ::testing::HasSubstr("failed its integrity check"));
  // The stream can no longer be trusted: the link stays broken.
  EXPECT_FALSE((*server.accepted)->Receive(100ms).ok());
}

TEST(TlsLinkTest, HandshakeNeverStartedTimesOut) {
  LinkOptions o = Tls("site-b");
  o.handshake_timeout = 200ms;
  ServerEnd server(o);
  auto client = ConnectTcp("127.0.0.1", server.port());  // connects, says nothing
  ASSERT_TRUE(client.ok());
  server.Join();
  EXPECT_EQ(server.handshake.code(), Code::kAborted) << server.handshake.ToString();
}

TEST(TlsLinkTest, BadFilesAreNamedInTheError) {
  TlsFiles f = TestCerts::Get().Files("site-a");
  f.key = TestCerts::Get().Files("site-b").key;
  auto ctx = TlsContext::Load(f);
  EXPECT_EQ(ctx.status().code(), Code::kInvalidArgument);
  EXPECT_NE(ctx.status().message().find("does not belong to cert"), std::string::npos)
      << ctx.status().ToString();
  f = TestCerts::Get().Files("site-a");
  f.ca = "/nonexistent/ca.pem";
  ctx = TlsContext::Load(f);
  EXPECT_NE(ctx.status().message().find("[tls] ca = /nonexistent/ca.pem"), std::string::npos)
      << ctx.status().ToString();
  f = TestCerts::Get().Files("site-a");
  f.cert = f.key;  // a key where a certificate belongs
  ctx = TlsContext::Load(f);
  EXPECT_NE(ctx.status().message().find("not a PEM certificate"), std::string::npos)
      << ctx.status().ToString();
}

// Polls `pred` until it holds or `deadline` passes.
template <typename Pred>
bool WaitFor(Pred pred, std::chrono::seconds deadline) {
  const auto end = std::chrono::steady_clock::now() + deadline;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::yield();
  }
  return true;
}

TEST(LinkServerTest, FloodThatNeverHandshakesIsClosedAtAcceptAndServiceResumes) {
  LinkOptions o = Tls("site-b");
  o.handshake_timeout = 1s;
  auto listener = Listener::ListenTcp("127.0.0.1", 0, o);
  ASSERT_TRUE(listener.ok());
  std::atomic<int> served{0};
  LinkServerLimits limits;
  limits.max_handshakes_per_address = 4;
  LinkServer server(
      "test", std::move(*listener),
      [&](Link& l) {
        ++served;
        auto f = l.Receive(5s);
        if (f.ok()) (void)l.Send(FrameType::kHelloReply, f->body, {});
      },
      limits);
  server.Start();
  std::vector<std::unique_ptr<Link>> flood;
  for (int i = 0; i < 20; ++i) {
    auto c = ConnectTcp("127.0.0.1", server.port());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    flood.push_back(std::move(*c));
  }
  ASSERT_TRUE(WaitFor([&] { return server.refused() >= 16; }, 20s))
      << "only " << server.refused() << " of the 16 connections over the limit were closed";
  EXPECT_EQ(served, 0);
  // The 4 admitted time out of their handshake; then a real peer is served.
  StatusOr<std::string> echoed = Internal("never connected");
  ASSERT_TRUE(WaitFor(
      [&] {
        auto c = ConnectTcp("127.0.0.1", server.port(), Tls("site-a"));
        if (!c.ok()) return false;
        if (!(*c)->Send(FrameType::kHello, "after the flood", {}).ok()) return false;
        auto f = (*c)->Receive(5s);
        if (f.ok()) echoed = f->body;
        return f.ok();
      },
      30s))
      << "no authenticated peer was served after the flood";
  EXPECT_EQ(*echoed, "after the flood");
  EXPECT_EQ(served, 1);
  server.Stop();
}

TEST(LinkServerTest, ManyLinksOpenedAtOnceWaitForAHandshakeSlotInsteadOfBeingRefused) {
  auto listener = Listener::ListenTcp("127.0.0.1", 0, Tls("site-b"));
  ASSERT_TRUE(listener.ok());
  LinkServerLimits limits;  // 8 handshakes from one address
  LinkServer server(
      "test", std::move(*listener),
      [](Link& l) {
        auto f = l.Receive(10s);
        if (f.ok()) (void)l.Send(FrameType::kHelloReply, f->body, {});
      },
      limits);
  server.Start();
  // A source starting 32 volumes at once, from one address. Its bound is
  // well under the server's: the server still counts a link whose client
  // has finished until it has read the client's last handshake message.
  LinkOptions o = Tls("site-a");
  o.max_handshakes_per_peer = 1;
  o.connect_timeout = 30s;
  std::atomic<int> echoed{0};
  std::vector<std::string> errors(32);
  std::vector<std::thread> volumes;
  for (int i = 0; i < 32; ++i) {
    volumes.emplace_back([&, i] {
      auto c = ConnectTcp("127.0.0.1", server.port(), o);
      if (!c.ok()) {
        errors[i] = c.status().ToString();
        return;
      }
      auto sent = (*c)->Send(FrameType::kHello, std::to_string(i), {});
      auto f = (*c)->Receive(10s);
      if (sent.ok() && f.ok() && f->body == std::to_string(i)) ++echoed;
    });
  }
  for (auto& t : volumes) t.join();
  for (int i = 0; i < 32; ++i) EXPECT_EQ(errors[i], "") << "link " << i;
  EXPECT_EQ(echoed, 32);
  EXPECT_EQ(server.refused(), 0u) << "the server closed links over its handshake limit";
  EXPECT_EQ(HandshakeSlots::Get().InFlight(fmt::format("127.0.0.1:{}", server.port())), 0u);
  server.Stop();
}

TEST(HandshakeSlotsTest, ASlotIsWaitedForUntilTheDeadlineAndFreedWithItsHolder) {
  HandshakeSlots& slots = HandshakeSlots::Get();
  const auto soon = [] { return std::chrono::steady_clock::now() + 20ms; };
  std::optional<HandshakeSlots::Slot> first(slots.Acquire("peer:1", 1, soon()));
  ASSERT_TRUE(first->held());
  EXPECT_FALSE(slots.Acquire("peer:1", 1, soon()).held()) << "a second slot of one";
  EXPECT_TRUE(slots.Acquire("peer:2", 1, soon()).held()) << "another peer has slots of its own";
  EXPECT_TRUE(slots.Acquire("peer:1", 0, soon()).held()) << "0: no bound";
  EXPECT_EQ(slots.InFlight("peer:1"), 1u);
  // A waiter gets the slot once its holder lets go.
  bool got = false;
  std::chrono::steady_clock::duration waited{};
  std::thread waiter([&] {
    const auto t0 = std::chrono::steady_clock::now();
    got = slots.Acquire("peer:1", 1, t0 + 10s).held();
    waited = std::chrono::steady_clock::now() - t0;
  });
  first.reset();
  waiter.join();
  EXPECT_TRUE(got);
  EXPECT_LT(waited, 5s) << "the waiter was not woken when the slot was let go";
  EXPECT_EQ(slots.InFlight("peer:1"), 0u);
}

}  // namespace
}  // namespace cairn
