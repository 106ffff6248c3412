#define BOOST_TEST_MODULE tracker_daemon_test
#include "support/seccomp_filter.hpp"
#include "support/test_support.hpp"

#include "tracker/codec.hpp"

#include <steward/unique_fd.hpp>

#include <fcntl.h>
#include <poll.h>
#include <semaphore.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

// The steward-tracker executable fed by hand: fork+exec with a pipe, lines written, the pipe
// closed, then exit status, stderr and the state of /dev/shm checked.

using namespace steward::detail::tracking;
using steward::resource_type;
using steward::unique_fd;
namespace fs = std::filesystem;

namespace {

constexpr int child_fd = 9;  // the descriptor number the daemon is told to read

std::string unique_name(std::string_view stem) {
    static std::atomic<int> counter{0};
    return "/stw_dmn_" + std::string(stem) + "_" + std::to_string(::getpid()) + "_" +
           std::to_string(counter++);
}

bool shm_exists(const std::string& name) {
    return ::access(("/dev/shm" + name).c_str(), F_OK) == 0;
}

// A POSIX shared memory segment created for a test and removed at scope exit whatever happens.
struct test_shm {
    std::string name;
    unique_fd fd;
    explicit test_shm(std::string_view stem) : name(unique_name(stem)) {
        fd.reset(::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600));
        BOOST_REQUIRE_MESSAGE(fd, "shm_open " << name << ": " << std::strerror(errno));
    }
    ~test_shm() { ::shm_unlink(name.c_str()); }
};

struct test_dir {
    fs::path path;
    explicit test_dir(std::string_view stem) : path(fs::temp_directory_path() / unique_name(stem).substr(1)) {
        fs::create_directories(path);
    }
    ~test_dir() {
        std::error_code ec;
        fs::remove_all(path, ec);
    }
};

std::string line(command cmd, resource_type type, std::string_view name) {
    encoded_message m;
    const auto ec = encode_message(cmd, type, name, m);
    BOOST_REQUIRE_MESSAGE(!ec, ec.message());
    return std::string(m.view());
}
std::string reg(resource_type t, std::string_view n) {
    return line(command::register_resource, t, n);
}
std::string unreg(resource_type t, std::string_view n) {
    return line(command::unregister_resource, t, n);
}

// Installs a seccomp filter making io_uring_setup fail with EPERM (Docker's default profile does
// the same). Async-signal-safe: used between fork and exec.
bool forbid_io_uring_setup() { return steward::test::install_errno_filter(__NR_io_uring_setup, EPERM) == 0; }

// One daemon under test. Its stdin is /dev/null, stdout ours, stderr a pipe we read at the end.
class daemon_process {
public:
    struct options {
        std::vector<std::string> argv;  // empty: {exe, "--fd", "9"}
        bool own_process_group = false;
        bool block_signals = true;          // as a real spawner does
        int stray_write_end = -1;           // also leave a copy of our write end open as this fd number
        bool forbid_io_uring = false;       // seccomp: io_uring_setup fails with EPERM, as under Docker
        bool nonblocking_read_end = false;  // a careless spawner's O_NONBLOCK on the daemon's end
    };

    daemon_process() : daemon_process(options{}) {}
    explicit daemon_process(options opt) {
        int in[2], err[2];
        BOOST_REQUIRE(::pipe2(in, O_CLOEXEC) == 0);
        unique_fd in_r{in[0]};
        input_.reset(in[1]);
        BOOST_REQUIRE(::pipe2(err, O_CLOEXEC) == 0);
        stderr_.reset(err[0]);
        unique_fd err_w{err[1]};
        std::vector<std::string> args = opt.argv;
        if (args.empty()) args = {STEWARD_TRACKER_EXE_FOR_TESTS, "--fd", std::to_string(child_fd)};
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        sigset_t blocked;
        sigemptyset(&blocked);
        if (opt.block_signals) {
            sigaddset(&blocked, SIGINT);
            sigaddset(&blocked, SIGTERM);
        }
        pid_ = ::fork();
        BOOST_REQUIRE(pid_ >= 0);
        if (pid_ == 0) {
            // Child: only async-signal-safe calls until exec.
            ::sigprocmask(SIG_BLOCK, &blocked, nullptr);
            ::signal(SIGPIPE, SIG_DFL);  // the test runner ignores it; the daemon must do so itself
            if (opt.own_process_group) ::setpgid(0, 0);
            const int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
            if (devnull < 0 || ::dup2(devnull, 0) < 0 || ::dup2(err_w.get(), 2) < 0) ::_exit(126);
            if (opt.stray_write_end >= 0 && ::dup2(in[1], opt.stray_write_end) < 0) ::_exit(126);
            if (opt.forbid_io_uring && !forbid_io_uring_setup()) ::_exit(125);
            if (opt.nonblocking_read_end && ::fcntl(in_r.get(), F_SETFL, O_NONBLOCK) != 0) ::_exit(126);
            if (in_r.get() == child_fd) {
                ::fcntl(child_fd, F_SETFD, 0);
            } else if (::dup2(in_r.get(), child_fd) < 0) {
                ::_exit(126);
            }
            ::execv(argv[0], argv.data());
            ::_exit(127);
        }
    }

    daemon_process(const daemon_process&) = delete;
    ~daemon_process() {
        if (pid_ > 0 && !reaped_) {
            input_.reset();
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
        }
    }

    pid_t pid() const { return pid_; }
    int input() const { return input_.get(); }

    void write(std::string_view bytes) {
        while (!bytes.empty()) {
            const ssize_t n = ::write(input_.get(), bytes.data(), bytes.size());
            BOOST_REQUIRE_MESSAGE(n > 0, "write to the daemon: " << std::strerror(errno));
            bytes.remove_prefix(static_cast<std::size_t>(n));
        }
    }

    // Returns once the daemon has consumed AND processed everything written so far: it reads the
    // pipe with one read outstanding at a time and submits the next read only after processing
    // the previous chunk (identity lookups included). So: wait for the pipe to drain, write a
    // PROBE, wait for that to drain too.
    void sync() {
        wait_drained();
        write("PROBE:0:noop\n");
        wait_drained();
    }

    // Closes our write end (the daemon sees EOF), collects stderr and the exit status.
    int finish() {
        input_.reset();
        std::string text;
        char buf[4096];
        for (;;) {
            pollfd p{stderr_.get(), POLLIN, 0};
            const int ready = ::poll(&p, 1, 30000);
            BOOST_REQUIRE_MESSAGE(ready == 1, "the daemon did not finish within 30 s");
            const ssize_t n = ::read(stderr_.get(), buf, sizeof buf);
            if (n <= 0) break;
            text.append(buf, static_cast<std::size_t>(n));
        }
        stderr_text_ = text;
        int status = 0;
        BOOST_REQUIRE(::waitpid(pid_, &status, 0) == pid_);
        reaped_ = true;
        BOOST_REQUIRE_MESSAGE(WIFEXITED(status), "daemon did not exit normally, status " << status);
        return WEXITSTATUS(status);
    }

    const std::string& err() const { return stderr_text_; }

    std::vector<std::string> err_lines() const {
        std::vector<std::string> lines;
        std::istringstream in(stderr_text_);
        for (std::string l; std::getline(in, l);) lines.push_back(l);
        return lines;
    }

private:
    void wait_drained() {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
        for (;;) {
            int queued = 0;
            BOOST_REQUIRE(::ioctl(input_.get(), FIONREAD, &queued) == 0);
            if (queued == 0) return;
            BOOST_REQUIRE_MESSAGE(std::chrono::steady_clock::now() < deadline, "the daemon stopped reading");
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
    }

    pid_t pid_ = -1;
    bool reaped_ = false;
    unique_fd input_;
    unique_fd stderr_;
    std::string stderr_text_;
};

std::string leak_line(std::string_view type, const std::vector<std::string>& quoted_names) {
    std::string l = "steward-tracker: There appear to be " + std::to_string(quoted_names.size()) +
                    " leaked " + std::string(type) + " objects to clean up at shutdown: {";
    for (std::size_t i = 0; i < quoted_names.size(); ++i) l += (i ? ", '" : "'") + quoted_names[i] + "'";
    return l + "}";
}

bool contains(const std::string& haystack, std::string_view needle) {
    return haystack.find(needle) != std::string::npos;
}

// Python 3 on PATH, for the interoperability tests (skipped, not passed, without it).
boost::test_tools::assertion_result python3_available(boost::unit_test::test_unit_id) {
    const bool ok = std::system("python3 -c 'import multiprocessing.resource_tracker' >/dev/null 2>&1") == 0;
    boost::test_tools::assertion_result result(ok);
    if (!ok)
        result.message() << "python3 with multiprocessing not found: CPython interoperability test skipped";
    return result;
}

// Runs a shell command and returns its stdout.
std::string capture(const std::string& command) {
    std::string out;
    FILE* p = ::popen(command.c_str(), "r");
    BOOST_REQUIRE(p);
    char buf[4096];
    while (const std::size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
    BOOST_REQUIRE(::pclose(p) == 0);
    return out;
}

// A daemon that exits early makes our next write fail with EPIPE: a test failure, not a signal
// that kills the test runner.
struct ignore_sigpipe {
    ignore_sigpipe() { ::signal(SIGPIPE, SIG_IGN); }
};
BOOST_TEST_GLOBAL_FIXTURE(ignore_sigpipe);

}  // namespace

BOOST_AUTO_TEST_CASE(help_version_and_usage_errors) {
    BOOST_TEST(capture(std::string(STEWARD_TRACKER_EXE_FOR_TESTS) + " --version") ==
               "steward-tracker 0.1.0\n");
    BOOST_TEST(contains(capture(std::string(STEWARD_TRACKER_EXE_FOR_TESTS) + " --help"), "--fd N"));
    for (const std::string bad : {"", "--fd", "--fd x", "--fd -3", "--bogus", "--fd 200"}) {
        const int status =
            std::system((std::string(STEWARD_TRACKER_EXE_FOR_TESTS) + " " + bad + " 2>/dev/null").c_str());
        BOOST_TEST(WIFEXITED(status));
        BOOST_TEST(WEXITSTATUS(status) == 64, "arguments '" << bad << "'");
    }
}

BOOST_AUTO_TEST_CASE(exit_0_when_everything_was_unregistered) {
    test_shm a("zero");
    daemon_process d;
    d.write(reg(resource_type::shared_memory, a.name) + reg(resource_type::shared_memory, a.name) +
            "PROBE:0:noop\n{\"cmd\":\"PROBE\",\"rtype\":\"noop\"}\n" +
            unreg(resource_type::shared_memory, a.name));
    BOOST_TEST(d.finish() == 0);
    BOOST_TEST(d.err() == "");
    BOOST_TEST(shm_exists(a.name));  // unregistered: not ours to remove
}

BOOST_AUTO_TEST_CASE(exit_1_leaks_are_reported_in_cpython_words_and_removed) {
    test_shm plain("plain"), no_slash("noslash"), colon("co:lon"), utf8("caf\xc3\xa9");
    const std::string sem_name = unique_name("sem");
    sem_t* sem = ::sem_open(sem_name.c_str(), O_CREAT | O_EXCL, 0600, 1);
    BOOST_REQUIRE(sem != SEM_FAILED);
    ::sem_close(sem);
    const std::string sem_file = "/dev/shm/sem." + sem_name.substr(1);
    BOOST_REQUIRE(::access(sem_file.c_str(), F_OK) == 0);

    test_dir area("area");
    const fs::path outside = area.path / "outside";
    const fs::path tree = area.path / "tree";
    fs::create_directories(outside);
    std::ofstream(outside / "precious") << "must survive";
    fs::create_directories(tree / "sub" / "deeper");
    std::ofstream(tree / "sub" / "deeper" / "f") << "x";
    fs::create_directory_symlink(outside, tree / "sub" / "escape");
    const fs::path file = area.path / "file";
    std::ofstream(file) << "y";

    daemon_process d;
    std::string input = reg(resource_type::shared_memory, plain.name);
    input += "REGISTER:" + no_slash.name.substr(1) + ":shared_memory\n";  // `abc` is `/abc`
    input += reg(resource_type::shared_memory, colon.name);               // JSON (':' in the name)
    input += reg(resource_type::shared_memory, utf8.name);                // JSON (UTF-8)
    input += reg(resource_type::semaphore, sem_name);
    input += reg(resource_type::file, file.string());
    input += reg(resource_type::directory, tree.string());
    d.write(input);
    BOOST_TEST(d.finish() == 1);
    const auto lines = d.err_lines();
    BOOST_REQUIRE_EQUAL(lines.size(), 4u);
    BOOST_TEST(lines[0] == leak_line("shared_memory", {plain.name, no_slash.name, colon.name, utf8.name}));
    BOOST_TEST(lines[1] == leak_line("semaphore", {sem_name}));
    BOOST_TEST(lines[2] == leak_line("file", {file.string()}));
    BOOST_TEST(lines[3] == leak_line("directory", {tree.string()}));
    for (const auto* s : {&plain, &no_slash, &colon, &utf8}) BOOST_TEST(!shm_exists(s->name), s->name);
    BOOST_TEST(::access(sem_file.c_str(), F_OK) != 0);
    BOOST_TEST(!fs::exists(file));
    BOOST_TEST(!fs::exists(fs::symlink_status(tree)));
    BOOST_TEST(fs::exists(outside / "precious"));  // the symlink inside the tree was not followed
}

BOOST_AUTO_TEST_CASE(exit_3_each_bad_line_is_one_warning_and_changes_nothing) {
    test_shm keep("keep");
    daemon_process d;
    const std::vector<std::string> bad = {
        "BOGUS\n",
        "DELETE:/x:shared_memory\n",
        "REGISTER:/x:dummy\n",
        "REGISTER:/x:noop\n",
        "{\"cmd\":\"REGISTER\"\n",
        "{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\",\"base64_name\":\"!!\"}\n",
        "{\"cmd\":\"REGISTER\",\"rtype\":\"shared_memory\"}\n",
        "REGISTER:relative/path:file\n",
        "REGISTER:/:directory\n",
        std::string(700, 'L') + "\n",
        "UNREGISTER:/never_registered:semaphore\n",
    };
    d.write(reg(resource_type::shared_memory, keep.name));
    for (const auto& b : bad) d.write(b);
    d.write(unreg(resource_type::shared_memory, keep.name));
    d.write(reg(resource_type::shared_memory, keep.name) + unreg(resource_type::shared_memory, keep.name));
    d.write("REGISTER:/half");  // unterminated at EOF
    BOOST_TEST(d.finish() == 3);
    const auto lines = d.err_lines();
    BOOST_REQUIRE_EQUAL(lines.size(), bad.size() + 1);
    for (const auto& l : lines) BOOST_TEST(l.starts_with("steward-tracker: ignoring "), l);
    BOOST_TEST(contains(lines[0], "missing ':'"));
    BOOST_TEST(contains(lines[1], "unknown command"));
    BOOST_TEST(contains(lines[2], "unknown resource type"));
    BOOST_TEST(contains(lines[3], "noop is for PROBE only"));
    BOOST_TEST(contains(lines[4], "malformed JSON"));
    BOOST_TEST(contains(lines[5], "not valid base64"));
    BOOST_TEST(contains(lines[6], "without"));
    BOOST_TEST(contains(lines[7], "absolute"));
    BOOST_TEST(contains(lines[8], "refusing"));
    BOOST_TEST(contains(lines[9], "longer than 512 bytes"));
    BOOST_TEST(lines[10] ==
               "steward-tracker: ignoring UNREGISTER of a semaphore name that is not registered: "
               "'/never_registered'");
    BOOST_TEST(contains(lines[11], "unterminated"));
    BOOST_TEST(shm_exists(keep.name));  // registered and unregistered around the noise: untouched
}

BOOST_AUTO_TEST_CASE(exit_2_a_failed_cleanup_names_the_object_and_the_error) {
    test_dir area("fail");
    const fs::path dir_as_file = area.path / "really_a_directory";
    fs::create_directory(dir_as_file);
    test_shm leaked("leak");
    daemon_process d;
    d.write(reg(resource_type::file, dir_as_file.string()) + reg(resource_type::shared_memory, leaked.name));
    BOOST_TEST(d.finish() == 2);
    BOOST_TEST(
        contains(d.err(), "steward-tracker: '" + dir_as_file.string() + "': [Errno 21] Is a directory\n"));
    BOOST_TEST(!shm_exists(leaked.name));  // the other leak was still removed
}

BOOST_AUTO_TEST_CASE(exit_status_precedence_is_2_then_3_then_1) {
    test_dir area("prec");
    const fs::path dir_as_file = area.path / "d";
    {
        test_shm s("p31");
        daemon_process d;  // leak + malformed -> 3
        d.write(reg(resource_type::shared_memory, s.name) + "GARBAGE\n");
        BOOST_TEST(d.finish() == 3);
        BOOST_TEST(!shm_exists(s.name));
    }
    {
        fs::create_directory(dir_as_file);
        daemon_process d;  // failure + malformed -> 2
        d.write("GARBAGE\n" + reg(resource_type::file, dir_as_file.string()));
        BOOST_TEST(d.finish() == 2);
    }
    {
        test_shm s("p21");
        daemon_process d;  // failure + leak cleaned -> 2
        d.write(reg(resource_type::shared_memory, s.name) + reg(resource_type::file, dir_as_file.string()));
        BOOST_TEST(d.finish() == 2);
        BOOST_TEST(!shm_exists(s.name));
    }
    {
        daemon_process d;  // nothing at all -> 0
        BOOST_TEST(d.finish() == 0);
        BOOST_TEST(d.err() == "");
    }
}

BOOST_AUTO_TEST_CASE(identity_check_leaves_a_reused_name_alone) {
    test_shm original("ident");
    daemon_process d;
    d.write(reg(resource_type::shared_memory, original.name));
    d.sync();  // the daemon has looked up the segment's identity
    // Another process unlinks the name and creates a new segment under it. Our fd keeps the
    // original's inode alive, so the new one cannot get the same inode number.
    const pid_t other = ::fork();
    BOOST_REQUIRE(other >= 0);
    if (other == 0) {
        if (::shm_unlink(original.name.c_str()) != 0) ::_exit(1);
        const int fd = ::shm_open(original.name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
        ::_exit(fd >= 0 ? 0 : 2);
    }
    int status = 0;
    BOOST_REQUIRE(::waitpid(other, &status, 0) == other);
    BOOST_REQUIRE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    BOOST_TEST(d.finish() == 1);
    BOOST_TEST(contains(d.err(), "steward-tracker: '" + original.name +
                                     "': left alone: the name now refers to a different object than the one "
                                     "registered\n"));
    BOOST_TEST(shm_exists(original.name));  // the newcomer's segment survived

    // Without the reuse, the same sequence removes it.
    test_shm second("ident2");
    daemon_process d2;
    d2.write(reg(resource_type::shared_memory, second.name));
    d2.sync();
    BOOST_TEST(d2.finish() == 1);
    BOOST_TEST(!shm_exists(second.name));

    // Recreated by the family and registered again: the new REGISTER names the new object.
    test_shm third("ident3");
    daemon_process d3;
    d3.write(reg(resource_type::shared_memory, third.name));
    d3.sync();
    BOOST_REQUIRE(::shm_unlink(third.name.c_str()) == 0);
    const unique_fd recreated{::shm_open(third.name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600)};
    BOOST_REQUIRE(recreated);
    d3.write(reg(resource_type::shared_memory, third.name));
    d3.sync();
    BOOST_TEST(d3.finish() == 1);
    BOOST_TEST(!contains(d3.err(), "left alone"), d3.err());
    BOOST_TEST(!shm_exists(third.name));
}

BOOST_AUTO_TEST_CASE(identity_check_with_many_names_uses_the_listing_and_still_holds) {
    // 100 new segments and a semaphore in one read: identities come from one /dev/shm listing.
    std::vector<std::unique_ptr<test_shm>> segments;
    for (int i = 0; i < 100; ++i) segments.push_back(std::make_unique<test_shm>("many"));
    const std::string sem_name = unique_name("many_sem");
    sem_t* sem = ::sem_open(sem_name.c_str(), O_CREAT | O_EXCL, 0600, 1);
    BOOST_REQUIRE(sem != SEM_FAILED);
    ::sem_close(sem);
    const std::string absent = unique_name("never_created");
    daemon_process d;
    std::string input;
    for (const auto& s : segments) input += reg(resource_type::shared_memory, s->name);
    input += reg(resource_type::semaphore, sem_name) + reg(resource_type::shared_memory, absent);
    d.write(input);
    d.sync();
    // Replace segment 7 and the semaphore behind the daemon's back (originals held open / kept
    // alive so the replacements get new inode numbers).
    const std::string& victim = segments[7]->name;
    const unique_fd old_sem{::open(("/dev/shm/sem." + sem_name.substr(1)).c_str(), O_RDONLY | O_CLOEXEC)};
    BOOST_REQUIRE(old_sem);
    BOOST_REQUIRE(::shm_unlink(victim.c_str()) == 0);
    const unique_fd replacement{::shm_open(victim.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600)};
    BOOST_REQUIRE(replacement);
    BOOST_REQUIRE(::sem_unlink(sem_name.c_str()) == 0);
    sem = ::sem_open(sem_name.c_str(), O_CREAT | O_EXCL, 0600, 1);
    BOOST_REQUIRE(sem != SEM_FAILED);
    ::sem_close(sem);
    BOOST_TEST(d.finish() == 1);
    BOOST_TEST(contains(d.err(), "'" + victim + "': left alone"), d.err());
    BOOST_TEST(contains(d.err(), "'" + sem_name + "': left alone"));
    BOOST_TEST(shm_exists(victim));
    BOOST_TEST(::access(("/dev/shm/sem." + sem_name.substr(1)).c_str(), F_OK) == 0);
    for (std::size_t i = 0; i < segments.size(); ++i)
        if (i != 7) BOOST_TEST(!shm_exists(segments[i]->name), segments[i]->name);
    ::sem_unlink(sem_name.c_str());
}

BOOST_AUTO_TEST_CASE(survives_sigint_sigterm_sighup_and_sigpipe_to_it_and_its_group) {
    test_shm s("signals");
    daemon_process::options opt;
    opt.own_process_group = true;
    daemon_process d(opt);
    d.write(reg(resource_type::shared_memory, s.name));
    d.sync();  // past start-up: dispositions set, SIGINT/SIGTERM unblocked

    std::ifstream status_file("/proc/" + std::to_string(d.pid()) + "/status");
    std::string l;
    unsigned long long ignored = 0, blocked = ~0ull;
    while (std::getline(status_file, l)) {
        if (l.starts_with("SigIgn:")) ignored = std::stoull(l.substr(7), nullptr, 16);
        if (l.starts_with("SigBlk:")) blocked = std::stoull(l.substr(7), nullptr, 16);
    }
    for (const int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) {
        BOOST_TEST((ignored >> (sig - 1) & 1) == 1u, "signal " << sig << " not ignored");
    }
    if (steward::test::runs_under_valgrind(d.pid())) {
        // The kernel's mask is valgrind's (it blocks everything and delivers signals itself);
        // what the daemon does with SIGINT/SIGTERM is checked by the kills below.
        BOOST_TEST_MESSAGE("daemon under valgrind: its blocked mask is not checked");
    } else {
        BOOST_TEST((blocked >> (SIGINT - 1) & 1) == 0u);
        BOOST_TEST((blocked >> (SIGTERM - 1) & 1) == 0u);
    }

    for (const int sig : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) {
        BOOST_REQUIRE(::kill(d.pid(), sig) == 0);
        BOOST_REQUIRE(::kill(-d.pid(), sig) == 0);  // the whole process group, as ^C would
    }
    d.sync();  // still reading
    BOOST_TEST(::kill(d.pid(), 0) == 0);
    BOOST_TEST(d.finish() == 1);
    BOOST_TEST(!shm_exists(s.name));
}

BOOST_AUTO_TEST_CASE(open_descriptors_are_stdio_the_pipe_and_the_ring_only) {
    // The spawn here is careless on purpose: every non-CLOEXEC descriptor of the test process, plus
    // a copy of the pipe's own write end, reaches the daemon. It must close them all, or it would
    // never see EOF.
    daemon_process::options opt;
    opt.stray_write_end = 33;
    daemon_process d(opt);
    d.sync();
    struct stat ours;
    BOOST_REQUIRE(::fstat(d.input(), &ours) == 0);
    const std::string pipe_link = "pipe:[" + std::to_string(ours.st_ino) + "]";
    std::set<int> seen;
    int ring_fds = 0;
    for (const auto& [fd, target] : steward::test::process_fd_targets(d.pid())) {
        seen.insert(fd);
        if (fd <= 2) continue;
        if (fd == child_fd) {
            BOOST_TEST(target == pipe_link);  // our pipe's read end, nothing else
            continue;
        }
#if STEWARD_IO_URING_BACKEND
        const bool ring = target == "anon_inode:[io_uring]" || target == "anon_inode:[eventfd]";
#else  // Asio's epoll reactor: its epoll set, its interrupter and its timer descriptor
        const bool ring = target == "anon_inode:[eventpoll]" || target == "anon_inode:[eventfd]" ||
                          target == "anon_inode:[timerfd]";
#endif
        BOOST_TEST(ring, "unexpected descriptor " << fd << " -> " << target);
        ring_fds += ring;
    }
    BOOST_TEST(seen.count(0) == 1u);
    BOOST_TEST(seen.count(1) == 1u);
    BOOST_TEST(seen.count(2) == 1u);
    BOOST_TEST(seen.count(child_fd) == 1u);
#if STEWARD_IO_URING_BACKEND
    BOOST_TEST(ring_fds <= 2);
#else
    BOOST_TEST(ring_fds <= 3);
#endif
    // Our write end is not among them (it would keep the daemon from ever seeing EOF).
    BOOST_TEST(d.finish() == 0);
}

BOOST_AUTO_TEST_CASE(many_messages_in_large_writes_across_read_boundaries) {
    // 200k messages written in big slabs: lines straddle the daemon's 64 KiB reads. Every second
    // name stays registered; they do not exist, so cleanup finds them already gone.
    daemon_process d;
    std::string slab;
    const std::string stem = unique_name("bulk");
    std::size_t kept = 0;
    for (int i = 0; i < 100000; ++i) {
        const std::string n = stem + "_" + std::to_string(i);
        slab += reg(resource_type::shared_memory, n);
        if (i % 2)
            slab += unreg(resource_type::shared_memory, n);
        else
            ++kept;
        if (slab.size() > 300000) {
            d.write(slab);
            slab.clear();
        }
    }
    d.write(slab);
    BOOST_TEST(d.finish() == 1);
    const auto lines = d.err_lines();
    BOOST_REQUIRE_EQUAL(lines.size(), 1u);
    BOOST_TEST(lines[0].starts_with("steward-tracker: There appear to be " + std::to_string(kept) +
                                    " leaked shared_memory objects"));
}

BOOST_AUTO_TEST_CASE(blocking_read_fallback_behaves_the_same) {
    test_shm s("blocking");
    daemon_process::options opt;
    opt.argv = {STEWARD_TRACKER_EXE_FOR_TESTS, "--fd", std::to_string(child_fd), "--no-io-uring"};
    daemon_process d(opt);
    d.write(reg(resource_type::shared_memory, s.name) + "oops\n");
    BOOST_TEST(d.finish() == 3);
    BOOST_TEST(!shm_exists(s.name));
}

BOOST_AUTO_TEST_CASE(falls_back_to_blocking_reads_when_seccomp_forbids_io_uring) {
    test_shm s("seccomp");
    daemon_process::options opt;
    opt.forbid_io_uring = true;
    daemon_process d(opt);
    d.write(reg(resource_type::shared_memory, s.name));
    d.sync();
    // No ring among its descriptors: it really is reading with read().
    for (const auto& entry : fs::directory_iterator("/proc/" + std::to_string(d.pid()) + "/fd"))
        BOOST_TEST(fs::read_symlink(entry.path()).string() != "anon_inode:[io_uring]");
    BOOST_TEST(d.finish() == 1);
    const auto lines = d.err_lines();
#if STEWARD_IO_URING_BACKEND
    BOOST_REQUIRE_EQUAL(lines.size(), 2u);
    BOOST_TEST(lines[0].starts_with("steward-tracker: io_uring unavailable ("), lines[0]);
    BOOST_TEST(contains(lines[0], "reading with blocking read() instead"));
#else  // an epoll build never asks for io_uring: the filter changes nothing and says nothing
    BOOST_REQUIRE_EQUAL(lines.size(), 1u);
#endif
    BOOST_TEST(lines.back() == leak_line("shared_memory", {s.name}));
    BOOST_TEST(!shm_exists(s.name));
}

BOOST_AUTO_TEST_CASE(a_non_blocking_read_end_is_not_mistaken_for_end_of_input) {
    // Without care, the first empty read (EAGAIN) would look like the family's end: the daemon
    // would clean up under live processes and exit. Both read paths must wait instead.
    for (const bool io_uring : {true, false}) {
        test_shm first("nonblock"), second("nonblock");
        daemon_process::options opt;
        opt.nonblocking_read_end = true;
        if (!io_uring)
            opt.argv = {STEWARD_TRACKER_EXE_FOR_TESTS, "--fd", std::to_string(child_fd), "--no-io-uring"};
        daemon_process d(opt);
        std::this_thread::sleep_for(std::chrono::milliseconds(20));  // let it meet an empty pipe
        d.write(reg(resource_type::shared_memory, first.name));
        d.sync();
        BOOST_TEST(shm_exists(first.name));  // not cleaned up early
        d.write(reg(resource_type::shared_memory, second.name));
        d.sync();
        BOOST_TEST(d.finish() == 1, d.err());
        BOOST_TEST(!shm_exists(first.name));
        BOOST_TEST(!shm_exists(second.name));
    }
}

// ---- CPython interoperability ------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(accepts_what_cpython_writers_produce,
                     *boost::unit_test::precondition(python3_available)) {
    test_shm colon_shm("py"), json_shm("py\xc3\xa9");
    // CPython <= 3.14 formats colon messages with this expression; 3.15 writes JSON with
    // json.dumps and base64.urlsafe_b64encode. Both are produced by the system python3 here.
    const std::string script =
        "import base64, json, sys\n"
        "def colon(cmd, name, rtype):\n"
        "    return '{0}:{1}:{2}\\n'.format(cmd, name, rtype).encode('ascii')\n"
        "def js(cmd, name, rtype):\n"
        "    b = base64.urlsafe_b64encode(name.encode('utf-8', 'surrogateescape')).decode('ascii')\n"
        "    return (json.dumps({'cmd': cmd, 'rtype': rtype, 'base64_name': b}) + '\\n').encode('ascii')\n"
        "out = sys.stdout.buffer\n"
        "out.write(b'PROBE:0:noop\\n')\n"
        "out.write(colon('REGISTER', sys.argv[1], 'shared_memory'))\n"
        "out.write(js('REGISTER', sys.argv[2], 'shared_memory'))\n"
        "out.write((json.dumps({'cmd': 'PROBE', 'rtype': 'noop'}) + '\\n').encode())\n";
    const fs::path script_path = fs::temp_directory_path() / (unique_name("script").substr(1) + ".py");
    std::ofstream(script_path) << script;
    const std::string lines =
        capture("python3 " + script_path.string() + " '" + colon_shm.name + "' '" + json_shm.name + "'");
    fs::remove(script_path);
    BOOST_TEST(contains(lines, "{\"cmd\": \"REGISTER\""));  // json.dumps' default separators
    daemon_process d;
    d.write(lines);
    BOOST_TEST(d.finish() == 1, d.err());
    BOOST_TEST(d.err_lines().size() == 1u);
    BOOST_TEST(!shm_exists(colon_shm.name));
    BOOST_TEST(!shm_exists(json_shm.name));
}

BOOST_AUTO_TEST_CASE(cpython_tracker_accepts_our_colon_lines,
                     *boost::unit_test::precondition(python3_available)) {
    test_shm a("ours"), b("ours_kept");
    daemon_process::options opt;
    opt.argv = {"/bin/sh", "-c",
                "exec python3 -c 'from multiprocessing.resource_tracker import main; main(" +
                    std::to_string(child_fd) + ")'"};
    daemon_process d(opt);
    d.write(line(command::probe, resource_type::noop, ""));
    d.write(reg(resource_type::shared_memory, a.name) + reg(resource_type::shared_memory, b.name) +
            unreg(resource_type::shared_memory, b.name));
    d.finish();  // CPython's exit status differs between versions (3.13 added 0-3)
    BOOST_TEST(contains(d.err(), "There appear to be 1 leaked shared_memory objects"), d.err());
    BOOST_TEST(!shm_exists(a.name));  // CPython removed what we registered
    BOOST_TEST(shm_exists(b.name));   // and honoured our UNREGISTER
}
