#define BOOST_TEST_MODULE tracker_raii_test
#include "support/fd_test_support.hpp"
#include "support/test_support.hpp"
#include "support/tracker_client_support.hpp"

#include <steward/error.hpp>
#include <steward/named_semaphore.hpp>
#include <steward/shared_memory.hpp>
#include <steward/tracker.hpp>

#include <asio/as_tuple.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/use_awaitable.hpp>

#include <sched.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/wait.h>

#include <cstring>

// shared_memory and named_semaphore: register before create, unlink before unregister, attach
// without registering, only the creating process unlinks.

using steward::named_semaphore;
using steward::resource_type;
using steward::shared_memory;
using steward::tracker;
namespace st = steward::test;
using namespace std::chrono_literals;

namespace {

struct fd_count_guard {
    int before;
    explicit fd_count_guard(asio::io_context& ctx) {
        { asio::posix::stream_descriptor warm(ctx); }
        before = st::open_fd_count();
    }
    ~fd_count_guard() { BOOST_CHECK_EQUAL(st::open_fd_count(), before); }
};

// The daemon's exit status after closing the tracker: 0 means nothing was left registered.
asio::awaitable<int> stop(tracker& t) {
    auto [ec, status] = co_await t.async_stop(10s, asio::as_tuple(asio::use_awaitable));
    BOOST_REQUIRE(!ec);
    BOOST_REQUIRE(status.has_value());
    co_return *status;
}

}  // namespace

STEWARD_CORO_TEST(shared_memory_create_map_attach_and_destroy) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string stem = st::unique_stem("shm");
    {
        shared_memory shm = shared_memory::create(t, stem, 4096);  // "abc" is "/abc"
        BOOST_CHECK_EQUAL(shm.name(), "/" + stem);
        BOOST_CHECK(shm.tracked());
        BOOST_CHECK(st::shm_exists(shm.name()));
        std::memcpy(shm.data(), "hello", 6);
        {
            shared_memory view = shared_memory::attach(shm.name());
            BOOST_CHECK(!view.tracked());
            BOOST_CHECK_EQUAL(view.size(), 4096u);
            BOOST_CHECK_EQUAL(static_cast<const char*>(view.data()), "hello");
        }  // an attached view never unlinks
        BOOST_CHECK(st::shm_exists(shm.name()));
        // The name is taken: refused, and the refused registration is withdrawn again.
        std::error_code ec;
        auto again = shared_memory::create(t, "/" + stem, 64, ec);
        BOOST_CHECK(ec == std::errc::file_exists);
        BOOST_CHECK(!again.valid());
        BOOST_CHECK_THROW((void)shared_memory::create(t, "a/b", 64), std::system_error);
        BOOST_CHECK_THROW((void)shared_memory::create(t, stem + "x", 0), std::system_error);
    }
    BOOST_CHECK(!st::shm_exists("/" + stem));  // destroyed: unlinked, then unregistered
    BOOST_CHECK_EQUAL(co_await stop(t), 0);    // nothing left registered, nothing malformed
    st::scrub_dev_shm(stem);
}

STEWARD_CORO_TEST(attach_does_not_register_unless_asked) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string stem = st::unique_stem("att");
    const std::string other = "/" + stem + "_other";
    const int fd = ::shm_open(other.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE_EQUAL(::ftruncate(fd, 100), 0);
    ::close(fd);
    {
        shared_memory view = shared_memory::attach(other);
        BOOST_CHECK_EQUAL(view.size(), 100u);
        co_await t.async_ensure_running(asio::use_awaitable);
    }
    BOOST_CHECK_EQUAL(co_await stop(t), 0);
    BOOST_CHECK(st::shm_exists(other));  // someone else's segment survives our family (gh-82300)

    tracker t2(ctx.get_executor());
    {
        shared_memory adopted = shared_memory::attach(t2, other.substr(1));
        BOOST_CHECK(adopted.tracked());
        std::error_code ec;
        (void)shared_memory::attach("/" + stem + "_missing", ec);
        BOOST_CHECK(ec == std::errc::no_such_file_or_directory);
        // Not the creator: destruction leaves it to the tracker.
    }
    BOOST_CHECK(st::shm_exists(other));
    BOOST_CHECK_EQUAL(co_await stop(t2), 1);  // adopted: removed by the family's daemon
    BOOST_CHECK(!st::shm_exists(other));
    st::scrub_dev_shm(stem);
}

STEWARD_CORO_TEST(unlink_is_unlink_then_unregister_and_only_the_creator_unlinks) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string stem = st::unique_stem("unl");
    shared_memory shm = shared_memory::create(t, stem, 128);
    const pid_t child = ::fork();
    if (child == 0) {
        // The child's copy of the object: destroying it must not remove the parent's segment.
        { shared_memory mine = std::move(shm); }
        ::_exit(0);
    }
    int wstatus = 0;
    ::waitpid(child, &wstatus, 0);
    BOOST_CHECK(st::shm_exists(shm.name()));
    shm.unlink();
    BOOST_CHECK(!st::shm_exists(shm.name()));
    BOOST_CHECK(!shm.tracked());
    std::error_code ec;
    shm.unlink(ec);
    BOOST_CHECK(ec == std::errc::no_such_file_or_directory);
    BOOST_CHECK_EQUAL(static_cast<char*>(shm.data())[0], 0);  // the mapping outlives the name
    shm = shared_memory();
    BOOST_CHECK_EQUAL(co_await stop(t), 0);
    st::scrub_dev_shm(stem);
}

STEWARD_CORO_TEST(async_create_of_both_kinds) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string stem = st::unique_stem("acr");
    auto [ec, shm] =
        co_await shared_memory::async_create(t, stem + "_m", 1 << 16, asio::as_tuple(asio::use_awaitable));
    BOOST_REQUIRE(!ec);
    BOOST_CHECK_EQUAL(shm.size(), 1u << 16);
    auto [ec2, sem] =
        co_await named_semaphore::async_create(t, stem + "_s", 1, asio::as_tuple(asio::use_awaitable));
    BOOST_REQUIRE(!ec2);
    BOOST_CHECK(sem.try_wait());
    BOOST_CHECK(!sem.try_wait());
    auto [ec3, dup] =
        co_await shared_memory::async_create(t, stem + "_m", 10, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(ec3 == std::errc::file_exists);
    auto [ec4, bad] =
        co_await named_semaphore::async_create(t, "x/y", 0, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(ec4 == std::errc::invalid_argument);
    const std::string shm_name = shm.name(), sem_name = sem.name();
    BOOST_CHECK(st::shm_exists(shm_name));
    BOOST_CHECK(st::sem_exists(sem_name));
    // The failed duplicate create did not withdraw the live object's registration: destroying the
    // objects unregisters both without a complaint from the daemon.
    shm = shared_memory();
    sem = named_semaphore();
    BOOST_CHECK(!st::shm_exists(shm_name));
    BOOST_CHECK(!st::sem_exists(sem_name));
    BOOST_CHECK_EQUAL(co_await stop(t), 0);
    st::scrub_dev_shm(stem);
}

STEWARD_CORO_TEST(named_semaphore_create_attach_post_wait_unlink) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string stem = st::unique_stem("sem");
    {
        named_semaphore sem = named_semaphore::create(t, stem, 0);
        BOOST_CHECK_EQUAL(sem.name(), "/" + stem);
        BOOST_CHECK(st::sem_exists(sem.name()));
        named_semaphore other = named_semaphore::attach(sem.name());
        BOOST_CHECK(!other.tracked());
        other.post();
        sem.wait();
        BOOST_CHECK(!sem.try_wait());
        std::error_code ec;
        (void)named_semaphore::create(t, stem, 0, ec);
        BOOST_CHECK(ec == std::errc::file_exists);
        (void)named_semaphore::attach("/" + stem + "_missing", ec);
        BOOST_CHECK(ec == std::errc::no_such_file_or_directory);
    }
    BOOST_CHECK(!st::sem_exists("/" + stem));
    {
        named_semaphore sem = named_semaphore::create(t, stem + "_2", 3);
        sem.unlink();
        BOOST_CHECK(!st::sem_exists(sem.name()));
        BOOST_CHECK(sem.try_wait());  // still usable after unlink
    }
    BOOST_CHECK_EQUAL(co_await stop(t), 0);
    st::scrub_dev_shm(stem);
}

// glibc's sem_open(O_CREAT) writes a new semaphore to a randomly named /dev/shm/sem.XXXXXX and then
// links it: a process killed at that moment leaves a file that no tracker knows about. create()
// names nothing but the semaphore. The child watches a /dev/shm of its own (a tmpfs in a private
// mount namespace, so other tests' files cannot appear in it) with inotify: the only name ever
// created there is the semaphore's, and the daemon removes it at the end.
BOOST_AUTO_TEST_CASE(named_semaphore_create_names_no_temporary_file) {
    auto child = st::fork_child([] {
        if (::unshare(CLONE_NEWNS) != 0) return 10;
        if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return 11;
        if (::mount("steward-test", "/dev/shm", "tmpfs", 0, "mode=1777") != 0) return 12;
        steward::unique_fd watch(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK));
        if (!watch || ::inotify_add_watch(watch.get(), "/dev/shm", IN_CREATE | IN_MOVED_TO) < 0) return 13;
        {
            asio::io_context io;
            tracker t(io.get_executor());
            named_semaphore sem = named_semaphore::create(t, "steward_unnamed_first", 2);
            if (!sem.try_wait() || !sem.try_wait() || sem.try_wait()) return 14;
            named_semaphore other = named_semaphore::attach("steward_unnamed_first");
            other.post();
            if (!sem.try_wait()) return 15;
            std::error_code ec;
            (void)named_semaphore::create(t, "steward_unnamed_first", 0, ec);
            if (ec != std::errc::file_exists) return 16;
            // A value sem_init refuses: EINVAL, and no file is created.
            (void)named_semaphore::create(t, "steward_value_too_big", unsigned(SEM_VALUE_MAX) + 1u, ec);
            if (ec != std::errc::invalid_argument) return 19;
        }
        std::vector<std::string> created;
        alignas(inotify_event) char buf[4096];
        for (ssize_t n; (n = ::read(watch.get(), buf, sizeof buf)) > 0;) {
            for (char* p = buf; p < buf + n;) {
                const auto* ev = reinterpret_cast<const inotify_event*>(p);
                if (ev->len) created.emplace_back(ev->name);
                p += sizeof(inotify_event) + ev->len;
            }
        }
        for (const auto& name : created) std::fprintf(stderr, "created in /dev/shm: %s\n", name.c_str());
        if (created != std::vector<std::string>{"sem.steward_unnamed_first"}) return 17;
        if (::access("/dev/shm/sem.steward_unnamed_first", F_OK) == 0) return 18;
        return 0;
    });
    BOOST_CHECK_EQUAL(child.wait(), 0);
}

STEWARD_CORO_TEST(failed_create_of_a_foreign_name_withdraws_its_registration) {
    fd_count_guard fds(ctx);
    tracker t(ctx.get_executor());
    const std::string stem = st::unique_stem("frn");
    // Objects this family did not create: a create that finds them must leave them alone, and its
    // registration must be withdrawn, or the daemon would remove someone else's object at exit.
    const std::string shm_name = "/" + stem + "_m";
    const int fd = ::shm_open(shm_name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    BOOST_REQUIRE(fd >= 0);
    ::close(fd);
    const std::string sem_name = "/" + stem + "_s";
    sem_t* s = ::sem_open(sem_name.c_str(), O_CREAT | O_EXCL, 0600, 0);
    BOOST_REQUIRE(s != SEM_FAILED);
    ::sem_close(s);

    std::error_code ec;
    (void)shared_memory::create(t, shm_name, 64, ec);
    BOOST_CHECK(ec == std::errc::file_exists);
    BOOST_CHECK(!t.is_registered(shm_name, resource_type::shared_memory));
    (void)named_semaphore::create(t, sem_name, 0, ec);
    BOOST_CHECK(ec == std::errc::file_exists);
    BOOST_CHECK(!t.is_registered(sem_name, resource_type::semaphore));
    auto [ec2, shm] = co_await shared_memory::async_create(t, shm_name, 64, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(ec2 == std::errc::file_exists);
    BOOST_CHECK(!shm.valid());
    auto [ec3, sem] = co_await named_semaphore::async_create(t, sem_name, 0, asio::as_tuple(asio::use_awaitable));
    BOOST_CHECK(ec3 == std::errc::file_exists);
    BOOST_CHECK(!t.is_registered(shm_name, resource_type::shared_memory));
    BOOST_CHECK(!t.is_registered(sem_name, resource_type::semaphore));

    // The throwing forms name the object.
    try {
        (void)shared_memory::create(t, shm_name.substr(1), 64);
        BOOST_ERROR("create of an existing segment did not throw");
    } catch (const std::system_error& e) {
        BOOST_CHECK(e.code() == std::errc::file_exists);
        BOOST_CHECK(std::string(e.what()).find("shared_memory::create " + shm_name) != std::string::npos);
    }
    try {
        (void)named_semaphore::attach(sem_name + "_missing");
        BOOST_ERROR("attach of a missing semaphore did not throw");
    } catch (const std::system_error& e) {
        BOOST_CHECK(std::string(e.what()).find("named_semaphore::attach " + sem_name + "_missing") !=
                    std::string::npos);
    }

    BOOST_CHECK_EQUAL(co_await stop(t), 0);  // nothing registered: the daemon removes nothing
    BOOST_CHECK(st::shm_exists(shm_name));
    BOOST_CHECK(st::sem_exists(sem_name));
    ::shm_unlink(shm_name.c_str());
    ::sem_unlink(sem_name.c_str());
    st::scrub_dev_shm(stem);
}
