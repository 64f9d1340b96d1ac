// FaultLink (engine/link/fault_link.h) stacked on each transport: the
// in-process pair, a real TCP connection over loopback, and mutual TLS on it. What the hook
// decides must reach the peer the same way over both: a dropped frame is
// missing, a duplicated one comes twice, a flipped bit fails the peer's
// checks, and after a cut the peer gets what came before, then kAborted.
#include "engine/link/fault_link.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/link/link.h"
#include "engine/link/tcp_link.h"
#include "tests/unit/link/test_certs.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using namespace std::chrono_literals;

::testing::AssertionResult IsOk(const Status& s) {
  if (s.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << s.ToString();
}

struct LinkPair {
  std::unique_ptr<Link> a, b;
};

StatusOr<LinkPair> MemoryPair() {
  auto [a, b] = MakeMemoryLinkPair();
  return LinkPair{std::move(a), std::move(b)};
}

// Both ends of one TCP connection on 127.0.0.1; with `tls`, mutual TLS
// between site-a (connecting) and site-b.
StatusOr<LinkPair> SocketPair(bool tls) {
  LinkOptions server, client;
  if (tls) {
    server.tls = testing::TestCerts::Get().Context("site-b");
    client.tls = testing::TestCerts::Get().Context("site-a");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Listener> listener, Listener::ListenTcp("127.0.0.1", 0, server));
  StatusOr<std::unique_ptr<Link>> accepted = Internal("not accepted");
  std::thread acceptor([&] {
    accepted = listener->Accept();
    if (accepted.ok()) {
      if (Status st = (*accepted)->Handshake(); !st.ok()) accepted = st;
    }
  });
  StatusOr<std::unique_ptr<Link>> connected = ConnectTcp("127.0.0.1", listener->port(), client);
  if (!connected.ok()) listener->Close();  // wakes the Accept
  acceptor.join();
  RETURN_IF_ERROR(connected.status());
  RETURN_IF_ERROR(accepted.status());
  return LinkPair{std::move(*connected), std::move(*accepted)};
}

StatusOr<LinkPair> TcpPair() { return SocketPair(false); }
StatusOr<LinkPair> TlsPair() { return SocketPair(true); }

struct Transport {
  std::string label;
  std::function<StatusOr<LinkPair>()> make;
};

class FaultLinkTest : public ::testing::TestWithParam<Transport> {
 protected:
  // The pair with `hook` on what `a` sends.
  LinkPair Make(WireFaultFn hook) {
    StatusOr<LinkPair> pair = GetParam().make();
    EXPECT_TRUE(pair.ok()) << pair.status().ToString();
    if (!pair.ok()) return {};
    pair->a = std::make_unique<FaultLink>(std::move(pair->a), std::move(hook));
    return std::move(*pair);
  }
};

// Sends frame `n` with a body naming it and a payload of n bytes.
Status SendNth(Link& link, int n) {
  const std::string payload(static_cast<size_t>(n), static_cast<char>('a' + n));
  return link.Send(FrameType::kRecord, "frame " + std::to_string(n), payload);
}

// Receives a frame and returns its body; fails the test on an error.
std::string ReceiveBody(Link& link) {
  StatusOr<Frame> f = link.Receive(5s);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  if (!f.ok()) return "";
  EXPECT_EQ(f->type, FrameType::kRecord);
  return f->body;
}

// Applies `fault` to the frames numbered in `at` (counted from 0).
WireFaultFn At(std::vector<int> at, WireFault fault) {
  auto count = std::make_shared<int>(0);
  return [count, at, fault](std::string&) {
    const int n = (*count)++;
    return std::find(at.begin(), at.end(), n) != at.end() ? fault : WireFault::kDeliver;
  };
}

TEST_P(FaultLinkTest, ADroppedFrameIsMissingAndTheLinkGoesOn) {
  LinkPair p = Make(At({1}, WireFault::kDrop));
  ASSERT_TRUE(p.a && p.b);
  for (int n = 0; n < 3; ++n) ASSERT_TRUE(IsOk(SendNth(*p.a, n)));  // the sender cannot tell
  EXPECT_EQ(ReceiveBody(*p.b), "frame 0");
  StatusOr<Frame> f = p.b->Receive(5s);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->body, "frame 2");
  EXPECT_EQ(std::string(f->payload.begin(), f->payload.end()), "cc");
  // Nothing else comes: the link is still up, and quiet.
  EXPECT_EQ(p.b->Receive(50ms).status().code(), Code::kUnavailable);
  // Both directions still work.
  ASSERT_TRUE(IsOk(SendNth(*p.b, 4)));
  EXPECT_EQ(ReceiveBody(*p.a), "frame 4");
}

TEST_P(FaultLinkTest, ADuplicatedFrameComesTwice) {
  LinkPair p = Make(At({0}, WireFault::kDuplicate));
  ASSERT_TRUE(p.a && p.b);
  ASSERT_TRUE(IsOk(SendNth(*p.a, 0)));
  ASSERT_TRUE(IsOk(SendNth(*p.a, 1)));
  EXPECT_EQ(ReceiveBody(*p.b), "frame 0");
  EXPECT_EQ(ReceiveBody(*p.b), "frame 0");
  EXPECT_EQ(ReceiveBody(*p.b), "frame 1");
}

TEST_P(FaultLinkTest, ACutBreaksTheLinkAfterWhatWasSentBefore) {
  LinkPair p = Make(At({2}, WireFault::kCut));
  ASSERT_TRUE(p.a && p.b);
  ASSERT_TRUE(IsOk(SendNth(*p.a, 0)));
  ASSERT_TRUE(IsOk(SendNth(*p.a, 1)));
  const Status cut = SendNth(*p.a, 2);
  EXPECT_EQ(cut.code(), Code::kAborted);
  EXPECT_NE(cut.message().find("cut"), std::string::npos) << cut.ToString();
  EXPECT_EQ(SendNth(*p.a, 3).code(), Code::kAborted);
  EXPECT_EQ(p.a->Receive(50ms).status().code(), Code::kAborted);
  // The peer gets the frames before the cut, then finds the link closed,
  // at once (not after a timeout), without the cut frame or any later.
  EXPECT_EQ(ReceiveBody(*p.b), "frame 0");
  EXPECT_EQ(ReceiveBody(*p.b), "frame 1");
  const auto start = std::chrono::steady_clock::now();
  const Status closed = p.b->Receive(5s).status();
  EXPECT_EQ(closed.code(), Code::kAborted) << closed.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s);
}

// The changed bytes reach the peer as they are: its checks catch them.
TEST_P(FaultLinkTest, AFlippedHeaderBitFailsThePeersChecks) {
  LinkPair p = Make([](std::string& bytes) {
    bytes[9] ^= 0x01;  // in body_len
    return WireFault::kDeliver;
  });
  ASSERT_TRUE(p.a && p.b);
  ASSERT_TRUE(IsOk(SendNth(*p.a, 1)));
  const Status s = p.b->Receive(5s).status();
  EXPECT_EQ(s.ToString(), "DataLoss: frame header checksum mismatch");
}

TEST_P(FaultLinkTest, AFlippedPayloadBitArrivesAsItIs) {
  LinkPair p = Make([](std::string& bytes) {
    bytes.back() ^= 0x01;
    return WireFault::kDeliver;
  });
  ASSERT_TRUE(p.a && p.b);
  ASSERT_TRUE(IsOk(SendNth(*p.a, 2)));
  StatusOr<Frame> f = p.b->Receive(5s);
  ASSERT_TRUE(f.ok()) << f.status().ToString();  // the payload's hash is the body's business
  EXPECT_EQ(std::string(f->payload.begin(), f->payload.end()), "c" + std::string(1, 'c' ^ 0x01));
}

// Fault layers stack: the outer one sees the frames the inner one let by.
TEST_P(FaultLinkTest, FaultLinksStack) {
  LinkPair p = Make(At({0}, WireFault::kDrop));
  ASSERT_TRUE(p.a && p.b);
  p.a = std::make_unique<FaultLink>(std::move(p.a), At({1}, WireFault::kDuplicate));
  for (int n = 0; n < 3; ++n) ASSERT_TRUE(IsOk(SendNth(*p.a, n)));
  EXPECT_EQ(ReceiveBody(*p.b), "frame 1");  // frame 0: dropped by the inner layer
  EXPECT_EQ(ReceiveBody(*p.b), "frame 1");  // doubled by the outer one
  EXPECT_EQ(ReceiveBody(*p.b), "frame 2");
}

INSTANTIATE_TEST_SUITE_P(Transports, FaultLinkTest,
                         ::testing::Values(Transport{"Memory", MemoryPair},
                                           Transport{"Tcp", TcpPair}, Transport{"Tls", TlsPair}),
                         [](const ::testing::TestParamInfo<Transport>& info) {
                           return info.param.label;
                         });

// A Link with no raw send of its own that keeps, encoded, what Send gets.
class SentFrames final : public Link {
 public:
  Status Send(FrameType t, std::string_view body, std::span<const char> payload) override {
    frames.push_back(EncodeFrame(t, body, payload));
    return OkStatus();
  }
  StatusOr<Frame> Receive(std::chrono::milliseconds) override { return Aborted("send only"); }
  void Close() override {}
  const std::string& peer() const override { return name_; }

  std::vector<std::string> frames;

 private:
  std::string name_ = "sent-frames";
};

// Link::SendEncoded's default carries a frame that passes its checks (a
// flipped payload bit) byte for byte, and refuses one that does not.
TEST(FaultLinkOverAPlainLink, TheDefaultRawSendCarriesSoundFramesAndRefusesDamagedOnes) {
  auto sent = std::make_unique<SentFrames>();
  SentFrames& wire = *sent;
  std::vector<std::string> hooked;
  FaultLink faulty(std::move(sent), [&](std::string& bytes) {
    bytes[hooked.empty() ? bytes.size() - 1 : 0] ^= 0x01;  // the payload, then the magic
    hooked.push_back(bytes);
    return WireFault::kDeliver;
  });
  ASSERT_TRUE(IsOk(SendNth(faulty, 1)));
  ASSERT_EQ(wire.frames.size(), 1u);
  EXPECT_TRUE(wire.frames[0] == hooked[0]) << "not the bytes the hook left";
  const Status s = SendNth(faulty, 1);
  EXPECT_EQ(s.code(), Code::kInternal) << s.ToString();
  EXPECT_NE(s.message().find("link to sent-frames cannot carry a damaged frame"), std::string::npos)
      << s.ToString();
  EXPECT_EQ(wire.frames.size(), 1u);
}

}  // namespace
}  // namespace cairn
