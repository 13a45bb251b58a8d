#include <doctest/doctest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "worker_shim/native/accept_balance.hpp"

using molt::native::AcceptBoard;
using molt::native::AsideListener;
using molt::native::kAsideStrandedChecks;
using molt::native::should_step_aside;

namespace {

// A board of `entries` 64-byte entries, as the master makes it (zero-filled memfd).
int make_board(std::size_t entries) {
    const int fd = memfd_create("test-accept-board", MFD_CLOEXEC);
    REQUIRE(fd >= 0);
    REQUIRE(ftruncate(fd, static_cast<off_t>(entries * 64)) == 0);
    return fd;
}

void hold(AcceptBoard& board, int connections) {
    board.set_connections(static_cast<std::size_t>(connections));
}

}  // namespace

TEST_CASE("a worker steps aside only for a sibling holding fewer by more than the slack") {
    CHECK_FALSE(should_step_aside(40, std::nullopt));  // nobody else can accept
    CHECK_FALSE(should_step_aside(2, 0));
    CHECK(should_step_aside(3, 0));
    // More than twice the sibling's count, plus 2.
    CHECK_FALSE(should_step_aside(10, 4));
    CHECK(should_step_aside(11, 4));
    CHECK_FALSE(should_step_aside(500, 249));
    CHECK(should_step_aside(501, 249));
}

TEST_CASE("siblings of one generation on a shared board") {
    const int fd = make_board(8);
    // cpus 0: every free sibling is hot (the reserves have a test case of their own).
    AcceptBoard a(fd, 1, 2, 0), b(fd, 1, 2, 0), other_generation(fd, 2, 2, 0);
    REQUIRE(a.active());
    REQUIRE(b.active());
    for (AcceptBoard* w : {&a, &b, &other_generation}) {
        w->publish();
        w->set_in_queue(true);
    }
    hold(a, 5);
    hold(other_generation, 0);

    SUBCASE("a sibling with fewer that can accept") {
        hold(b, 2);
        CHECK_FALSE(a.should_step_aside());
        hold(b, 1);
        CHECK(a.should_step_aside());
        CHECK_FALSE(b.should_step_aside());
    }
    SUBCASE("a sibling with every thread busy cannot take a connection now") {
        hold(b, 0);
        b.thread_busy();
        CHECK(a.should_step_aside());
        b.thread_busy();
        CHECK_FALSE(a.should_step_aside());
        b.thread_free();
        CHECK(a.should_step_aside());
    }
    SUBCASE("a booting sibling (not listening yet) is not one") {
        AcceptBoard booting(fd, 1, 2, 0);
        hold(b, 5);
        CHECK_FALSE(a.should_step_aside());
        booting.publish();
        booting.set_in_queue(true);
        CHECK(a.should_step_aside());
    }
    SUBCASE("a draining sibling is no longer one") {
        hold(b, 0);
        b.leave();
        CHECK_FALSE(a.should_step_aside());
    }
    SUBCASE("a sibling standing aside with fewer is called back") {
        hold(b, 0);
        b.set_in_queue(false);
        CHECK(a.should_step_aside());  // it will be back: a steps aside for it
        const auto started = std::chrono::steady_clock::now();
        b.wait_for_call(10000);  // returns at once: the call came before the wait
        CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));
    }
    SUBCASE("a worker without a watcher takes its call when it looks") {
        hold(b, 0);
        b.set_in_queue(false);
        CHECK_FALSE(b.take_call());
        CHECK(a.should_step_aside());
        CHECK(b.take_call());
        CHECK_FALSE(b.take_call());  // taken once
    }
    SUBCASE("a listener aside comes back when the board says so, or for a stranded queue") {
        hold(b, 0);
        AsideListener l;
        bool queued = false;
        const auto is_queued = [&] { return queued; };
        CHECK(l.step_aside(a, is_queued));
        CHECK(l.aside);
        CHECK(l.come_back(false, false));   // no longer over its share
        CHECK(l.step_aside(a, is_queued));  // ... which the board does not say yet
        for (int look = 1; look < kAsideStrandedChecks; ++look) {
            CHECK_FALSE(l.come_back(true, true));  // the siblings may not have run yet
        }
        CHECK_FALSE(l.come_back(true, false));  // taken meanwhile: the count starts again
        for (int look = 1; look < kAsideStrandedChecks; ++look)
            CHECK_FALSE(l.come_back(true, true));
        CHECK(l.come_back(true, true));  // nobody took it: this worker does
        queued = true;
        CHECK_FALSE(l.step_aside(a, is_queued));  // in, over its share, while the queue holds any
        CHECK_FALSE(l.step_aside(a, is_queued));
        queued = false;
        CHECK(l.step_aside(a, is_queued));  // empty: the board decides again
    }
    SUBCASE("a call wakes a waiting watcher") {
        hold(b, 0);
        b.set_in_queue(false);
        // Whether the watcher is already waiting or not yet, the call ends its wait long
        // before the wait's own 10 s timeout.
        auto waited = std::chrono::seconds(0);
        std::thread watcher([&] {
            const auto started = std::chrono::steady_clock::now();
            b.wait_for_call(10000);
            waited = std::chrono::duration_cast<std::chrono::seconds>(
                std::chrono::steady_clock::now() - started);
        });
        a.should_step_aside();
        watcher.join();
        CHECK(waited < std::chrono::seconds(5));
    }
    close(fd);
}

TEST_CASE("a reserve steps aside while the hot workers ahead of it can accept") {
    using molt::native::SiblingsView;
    CHECK(should_step_aside(0, 2, SiblingsView{2, 5}));  // two ahead, two CPUs: a reserve
    CHECK(should_step_aside(0, 2, SiblingsView{3, 5}));
    CHECK_FALSE(should_step_aside(0, 2, SiblingsView{1, 5}));   // hot
    CHECK(should_step_aside(11, 2, SiblingsView{1, 4}));        // hot, over its share
    CHECK_FALSE(should_step_aside(11, 0, SiblingsView{7, 5}));  // no reserves: the slack only
    CHECK_FALSE(should_step_aside(0, 1, SiblingsView{0, std::nullopt}));
}

TEST_CASE("on a board, the first free workers of a generation are hot, one per CPU") {
    const int fd = make_board(8);
    AcceptBoard first(fd, 1, 2, 2), second(fd, 1, 2, 2), third(fd, 1, 2, 2), fourth(fd, 1, 2, 2);
    for (AcceptBoard* w : {&first, &second, &third, &fourth}) {
        w->publish();
        w->set_in_queue(true);
    }
    hold(first, 30);
    hold(second, 30);
    CHECK_FALSE(first.should_step_aside());  // the other hot one holds as many
    CHECK_FALSE(second.should_step_aside());
    CHECK(third.should_step_aside());  // two hot workers ahead of it that can accept
    CHECK(third.reserve());
    CHECK(fourth.should_step_aside());
    CHECK_FALSE(first.reserve());

    SUBCASE("the hot workers balance among themselves only") {
        hold(second, 10);
        CHECK(first.should_step_aside());  // 30 > 2 * 10 + 2; the reserves' 0 does not count
        hold(second, 14);
        CHECK_FALSE(first.should_step_aside());
    }
    SUBCASE("a hot worker that cannot accept makes the next one hot") {
        second.thread_busy();
        second.thread_busy();                    // every thread busy
        CHECK_FALSE(third.should_step_aside());  // it steps in
        CHECK_FALSE(third.reserve());
        CHECK(fourth.should_step_aside());
        // The busy one is still hot, and the reserve stepping in is not: the first does not
        // step aside for its 0 connections (no thrash while a thread is busy for a moment).
        CHECK_FALSE(first.should_step_aside());
        second.thread_free();
        CHECK(third.should_step_aside());
    }
    SUBCASE("a draining hot worker leaves its place to the next") {
        first.leave();
        CHECK_FALSE(third.should_step_aside());
        CHECK(fourth.should_step_aside());
    }
    SUBCASE("a reserve standing aside is not called back") {
        third.set_in_queue(false);
        fourth.set_in_queue(false);
        hold(first, 40);
        CHECK_FALSE(first.should_step_aside());
        CHECK_FALSE(third.take_call());
        CHECK_FALSE(fourth.take_call());
    }
    close(fd);
}

TEST_CASE("a reserve takes a stranded queue after fewer, slower looks") {
    AsideListener l;
    l.aside = true;
    CHECK_FALSE(l.come_back(true, true, molt::native::kReserveStrandedChecks));
    CHECK(l.come_back(true, true, molt::native::kReserveStrandedChecks));
    CHECK(l.taking_stranded);
}

TEST_CASE("this process may run on at least one CPU") {
    CHECK(molt::native::usable_cpus() >= 1);
}

TEST_CASE("a cgroup CPU quota, v2 or v1, the smallest on the path to the root") {
    using molt::native::cgroup_cpu_limit;
    char tmpl[] = "/tmp/molt-cgroup-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    const std::string root = tmpl;
    auto write = [&](const std::string& rel, const std::string& text) {
        std::filesystem::create_directories(std::filesystem::path(root + rel).parent_path());
        std::ofstream(root + rel) << text;
    };
    write("/cpu.max", "max 100000\n");
    write("/system.slice/cpu.max", "max 100000\n");
    write("/system.slice/molt.service/cpu.max", "150000 100000\n");  // 1.5 CPUs: 2
    CHECK(cgroup_cpu_limit("0::/system.slice/molt.service\n", root) == 2);
    write("/system.slice/cpu.max", "100000 100000\n");  // the slice's 1 CPU applies too
    CHECK(cgroup_cpu_limit("0::/system.slice/molt.service\n", root) == 1);
    CHECK(cgroup_cpu_limit("0::/\n", root) == 0);  // no quota at the root
    CHECK(cgroup_cpu_limit("0::/elsewhere\n", root) == 0);
    // v1: the cpu controller's hierarchy, -1 for no quota.
    write("/cpu/docker/abc/cpu.cfs_quota_us", "300000\n");
    write("/cpu/docker/abc/cpu.cfs_period_us", "100000\n");
    write("/cpu/docker/cpu.cfs_quota_us", "-1\n");
    write("/cpu/docker/cpu.cfs_period_us", "100000\n");
    CHECK(cgroup_cpu_limit("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n", root) == 3);
    CHECK(cgroup_cpu_limit("3:cpuacct:/docker/abc\n", root) == 0);  // not the cpu controller
    CHECK(cgroup_cpu_limit("", root) == 0);
    CHECK(cgroup_cpu_limit("garbage\n", root) == 0);
    std::filesystem::remove_all(root);
}

TEST_CASE("without a usable board a worker accepts as it comes") {
    AcceptBoard none(-1, 1, 4);
    CHECK_FALSE(none.active());
    none.set_connections(100);
    CHECK_FALSE(none.should_step_aside());

    const int odd = memfd_create("test-accept-board", MFD_CLOEXEC);
    REQUIRE(ftruncate(odd, 100) == 0);  // not whole entries
    AcceptBoard malformed(odd, 1, 4);
    CHECK_FALSE(malformed.active());
    close(odd);

    const int fd = make_board(2);
    AcceptBoard first(fd, 1, 1), second(fd, 1, 1), third(fd, 1, 1);
    CHECK(first.active());
    CHECK(second.active());
    CHECK_FALSE(third.active());  // the board is full
    close(fd);
}

TEST_CASE("an entry is free again once its worker left") {
    const int fd = make_board(1);
    {
        AcceptBoard first(fd, 1, 1);
        CHECK(first.active());
    }
    AcceptBoard next(fd, 1, 1);
    CHECK(next.active());
    close(fd);
}
