// The KvStore conformance suite: value-parameterized tests every KvStore
// must pass (MemoryKvStore in tests/unit/catalog/kv_store_test.cc,
// RadosKvStore in tests/ceph/kv_store_rados_test.cc).
//
// Atomicity across a crash is structural (RadosKvStore sends each Commit as
// one RADOS write operation); what a test can see is that a reader never
// observes half of a commit, and that is checked here.
//
// Usage: include in exactly ONE .cc of a test binary, then
// INSTANTIATE_TEST_SUITE_P(Name, KvStoreConformanceTest,
// ::testing::Values(KvStoreConformanceParam{...}), KvStoreParamName).
//
// Thread-safety: tests run on gtest's thread, except where a test says.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "engine/base/status.h"
#include "engine/catalog/kv_store.h"

namespace cairn {

// One empty store for one test.
struct KvStoreTarget {
  std::unique_ptr<KvStore> store;
  // Called after the test (drops the store's backing object); may be empty.
  std::function<void()> cleanup;
};

struct KvStoreConformanceParam {
  std::string label;
  std::function<StatusOr<KvStoreTarget>()> make;
};

inline void PrintTo(const KvStoreConformanceParam& p, std::ostream* os) { *os << p.label; }

inline std::string KvStoreParamName(const ::testing::TestParamInfo<KvStoreConformanceParam>& info) {
  return info.param.label;
}

class KvStoreConformanceTest : public ::testing::TestWithParam<KvStoreConformanceParam> {
 protected:
  void SetUp() override {
    StatusOr<KvStoreTarget> target = GetParam().make();
    ASSERT_TRUE(target.ok()) << target.status().ToString();
    target_ = std::move(*target);
  }
  void TearDown() override {
    target_.store.reset();
    if (target_.cleanup) target_.cleanup();
  }
  KvStore& kv() { return *target_.store; }

  // Commits or fails the test.
  void Commit(const std::map<std::string, std::string>& set,
              const std::vector<std::string>& remove = {}) {
    const Status s = kv().Commit(set, remove);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  std::map<std::string, std::string> Scan(const std::string& prefix) {
    StatusOr<std::map<std::string, std::string>> m = kv().Scan(prefix);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return m.ok() ? *m : std::map<std::string, std::string>{};
  }

  KvStoreTarget target_;
};

TEST_P(KvStoreConformanceTest, AnEmptyStoreHasNothing) {
  EXPECT_TRUE(Scan("").empty());
  EXPECT_TRUE(Scan("point/").empty());
  const StatusOr<std::string> v = kv().Get("anything");
  EXPECT_EQ(v.status().code(), Code::kNotFound) << v.status().ToString();
}

TEST_P(KvStoreConformanceTest, CommitThenGetAndScan) {
  Commit({{"point/vol1/0001", "a"}, {"point/vol1/0002", "b"}, {"cursor/vol1", "7"}});
  StatusOr<std::string> v = kv().Get("point/vol1/0002");
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, "b");
  EXPECT_EQ(Scan(""),
            (std::map<std::string, std::string>{
                {"cursor/vol1", "7"}, {"point/vol1/0001", "a"}, {"point/vol1/0002", "b"}}));
  EXPECT_EQ(Scan("point/"), (std::map<std::string, std::string>{{"point/vol1/0001", "a"},
                                                                {"point/vol1/0002", "b"}}));
  EXPECT_TRUE(Scan("point/vol2/").empty());
}

TEST_P(KvStoreConformanceTest, OverwriteAndRemove) {
  Commit({{"k1", "v1"}, {"k2", "v2"}});
  Commit({{"k1", "v1-new"}}, {"k2", "never-existed"});
  StatusOr<std::string> v = kv().Get("k1");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, "v1-new");
  EXPECT_EQ(kv().Get("k2").status().code(), Code::kNotFound);
  EXPECT_EQ(Scan(""), (std::map<std::string, std::string>{{"k1", "v1-new"}}));
  Commit({}, {});  // an empty commit is fine
  Commit({}, {"k1"});
  EXPECT_TRUE(Scan("").empty());
}

TEST_P(KvStoreConformanceTest, SetAndRemoveOfOneKeyInOneCommitRemoves) {
  Commit({{"k", "old"}});
  Commit({{"k", "new"}}, {"k"});
  EXPECT_EQ(kv().Get("k").status().code(), Code::kNotFound);
}

TEST_P(KvStoreConformanceTest, ValuesAreBinarySafe) {
  const std::string binary("\0\x01\xff\n\0end", 8);
  Commit({{"bin", binary}, {"empty", ""}});
  StatusOr<std::string> v = kv().Get("bin");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, binary);
  v = kv().Get("empty");
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, "");
  EXPECT_EQ(Scan("bin").at("bin"), binary);
}

TEST_P(KvStoreConformanceTest, PrefixScanIsExactAndOrdered) {
  Commit({{"a", "0"},
          {"a/", "1"},
          {"a/b", "2"},
          {"a/b/c", "3"},
          {"a0", "4"},
          {"a.", "5"},
          {"b/", "6"},
          {"A/", "7"}});
  EXPECT_EQ(Scan("a/"),
            (std::map<std::string, std::string>{{"a/", "1"}, {"a/b", "2"}, {"a/b/c", "3"}}));
  EXPECT_EQ(Scan("a").size(), 6u);
  EXPECT_EQ(Scan("a/b/c"), (std::map<std::string, std::string>{{"a/b/c", "3"}}));
  EXPECT_TRUE(Scan("a/b/c/").empty());
  EXPECT_EQ(Scan("").size(), 8u);
}

// RadosKvStore reads at most 512 pairs per round trip: a scan must page.
TEST_P(KvStoreConformanceTest, ScanPagesThroughManyKeys) {
  constexpr int kMatching = 1500;
  std::map<std::string, std::string> set;
  for (int i = 0; i < kMatching; ++i) {
    char key[32];
    std::snprintf(key, sizeof key, "point/v/%06d", i);
    set[key] = std::string(1 + i % 50, static_cast<char>('a' + i % 26));
  }
  // Neighbours on both sides of the prefix, which must not leak in.
  for (int i = 0; i < 600; ++i) {
    set["point/u/" + std::to_string(i)] = "before";
    set["point/w/" + std::to_string(i)] = "after";
  }
  Commit(set);
  const std::map<std::string, std::string> got = Scan("point/v/");
  ASSERT_EQ(got.size(), static_cast<size_t>(kMatching));
  int i = 0;
  for (const auto& [k, v] : got) {
    char key[32];
    std::snprintf(key, sizeof key, "point/v/%06d", i);
    ASSERT_EQ(k, key);
    ASSERT_EQ(v, set[key]);
    ++i;
  }
  EXPECT_EQ(Scan("").size(), static_cast<size_t>(kMatching + 1200));
  EXPECT_EQ(Scan("point/").size(), static_cast<size_t>(kMatching + 1200));
}

// A reader sees all of a commit or none of it.
TEST_P(KvStoreConformanceTest, ReadersNeverSeeHalfACommit) {
  constexpr int kBatches = 20;
  constexpr int kPerBatch = 100;
  std::atomic<bool> done{false};
  std::atomic<int> torn{0};
  std::atomic<int> scans{0};
  std::atomic<bool> started{false};
  std::thread reader([&] {
    do {
      for (int b = 0; b < kBatches; ++b) {
        StatusOr<std::map<std::string, std::string>> m =
            kv().Scan("batch/" + std::to_string(b) + "/");
        if (!m.ok()) continue;
        if (m->size() != 0 && m->size() != kPerBatch) ++torn;
        ++scans;
      }
      started = true;
    } while (!done.load());
  });
  while (!started.load()) std::this_thread::yield();  // overlap the reader
  for (int b = 0; b < kBatches; ++b) {
    std::map<std::string, std::string> set;
    for (int k = 0; k < kPerBatch; ++k) {
      set["batch/" + std::to_string(b) + "/" + std::to_string(k)] = std::to_string(b);
    }
    const Status s = kv().Commit(set, {});
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  done = true;
  reader.join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_GT(scans.load(), 0);
  EXPECT_EQ(Scan("batch/").size(), static_cast<size_t>(kBatches * kPerBatch));
}

TEST_P(KvStoreConformanceTest, CommitsFromManyThreads) {
  constexpr int kThreads = 4;
  constexpr int kCommits = 50;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCommits; ++i) {
        const std::string key = "t" + std::to_string(t) + "/" + std::to_string(i);
        if (!kv().Commit({{key, key}}, {}).ok()) ++failures;
        if (!kv().Get(key).ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(Scan("").size(), static_cast<size_t>(kThreads * kCommits));
}

TEST_P(KvStoreConformanceTest, CommitIfAbsentOnAnEmptyStore) {
  Status s = kv().CommitIf("owner", std::nullopt, {{"owner", "a"}, {"other", "x"}}, {});
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(Scan(""), (std::map<std::string, std::string>{{"other", "x"}, {"owner", "a"}}));
  // Now present: expecting it absent fails and changes nothing.
  s = kv().CommitIf("owner", std::nullopt, {{"owner", "b"}}, {"other"});
  EXPECT_EQ(s.code(), Code::kAborted) << s.ToString();
  EXPECT_EQ(Scan(""), (std::map<std::string, std::string>{{"other", "x"}, {"owner", "a"}}));
}

TEST_P(KvStoreConformanceTest, CommitIfComparesTheWholeValue) {
  const std::string binary("a\0b", 3);
  Commit({{"owner", binary}, {"k", "1"}});
  for (const std::string& wrong : {std::string("a"), std::string("a\0c", 3), binary + "x"}) {
    const Status s = kv().CommitIf("owner", wrong, {{"owner", "b"}}, {"k"});
    EXPECT_EQ(s.code(), Code::kAborted) << s.ToString();
  }
  // An absent key is not any value, on a store that has other keys too.
  Status s = kv().CommitIf("nobody", std::string("x"), {{"nobody", "y"}}, {});
  EXPECT_EQ(s.code(), Code::kAborted) << s.ToString();
  EXPECT_EQ(Scan(""), (std::map<std::string, std::string>{{"k", "1"}, {"owner", binary}}));
  s = kv().CommitIf("owner", binary, {{"owner", "b"}, {"new", "2"}}, {"k"});
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(Scan(""), (std::map<std::string, std::string>{{"new", "2"}, {"owner", "b"}}));
  // The compared key itself may be removed.
  s = kv().CommitIf("owner", std::string("b"), {}, {"owner"});
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(kv().Get("owner").status().code(), Code::kNotFound);
}

TEST_P(KvStoreConformanceTest, CommitIfRefusesAnEmptyExpectedValue) {
  const Status s = kv().CommitIf("k", std::string(), {{"k", "v"}}, {});
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  EXPECT_TRUE(Scan("").empty());
}

// Many writers each read the key, then try to replace what they read:
// every replacement that succeeds saw the value it replaced, so none is
// lost: the number of successes is the number of changes made.
TEST_P(KvStoreConformanceTest, CommitIfLetsOneOfRacingWritersWin) {
  constexpr int kThreads = 4;
  constexpr int kTries = 25;
  std::vector<std::thread> threads;
  std::atomic<int> won{0};
  std::atomic<int> errors{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kTries; ++i) {
        StatusOr<std::string> seen = kv().Get("counter");
        std::optional<std::string> expected;
        int n = 0;
        if (seen.ok()) {
          expected = *seen;
          n = std::stoi(seen->substr(0, seen->find('/')));
        } else if (seen.status().code() != Code::kNotFound) {
          ++errors;
          continue;
        }
        const std::string next = std::to_string(n + 1) + "/" + std::to_string(t);
        const Status s = kv().CommitIf("counter", expected, {{"counter", next}}, {});
        if (s.ok()) {
          ++won;
        } else if (s.code() != Code::kAborted) {
          ++errors;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  StatusOr<std::string> last = kv().Get("counter");
  ASSERT_TRUE(last.ok()) << last.status().ToString();
  EXPECT_EQ(std::stoi(last->substr(0, last->find('/'))), won.load());
  EXPECT_GE(won.load(), 1);
}

}  // namespace cairn
