#include "sharer/native_protocol.hpp"

#include <steward/error.hpp>

#include "sharer/framing.hpp"

#include <algorithm>
#include <stdexcept>

namespace steward::detail::native {
namespace {

class writer {
public:
    explicit writer(msg_type t) { u8(static_cast<std::uint8_t>(t)); }
    void u8(std::uint8_t v) { out_.push_back(static_cast<std::byte>(v)); }
    void u16(std::uint16_t v) { be(v, 2); }
    void u32(std::uint32_t v) { be(v, 4); }
    void u64(std::uint64_t v) { be(v, 8); }
    void bytes(std::span<const std::byte> b) { out_.insert(out_.end(), b.begin(), b.end()); }
    std::vector<std::byte> take() { return std::move(out_); }

private:
    void be(std::uint64_t v, int n) {
        for (int i = n - 1; i >= 0; --i) out_.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
    }
    std::vector<std::byte> out_;
};

class reader {
public:
    explicit reader(std::span<const std::byte> data) : data_(data) {}
    bool u8(std::uint8_t& v) { return be(v, 1); }
    bool u16(std::uint16_t& v) { return be(v, 2); }
    bool u32(std::uint32_t& v) { return be(v, 4); }
    bool u64(std::uint64_t& v) { return be(v, 8); }
    bool bytes(std::size_t n, std::span<const std::byte>& out) {
        if (data_.size() - pos_ < n) return false;
        out = data_.subspan(pos_, n);
        pos_ += n;
        return true;
    }
    [[nodiscard]] bool at_end() const { return pos_ == data_.size(); }
    [[nodiscard]] std::size_t remaining() const { return data_.size() - pos_; }

private:
    template <typename T>
    bool be(T& v, std::size_t n) {
        if (data_.size() - pos_ < n) return false;
        std::uint64_t x = 0;
        for (std::size_t i = 0; i < n; ++i) x = (x << 8) | std::to_integer<std::uint64_t>(data_[pos_ + i]);
        pos_ += n;
        v = static_cast<T>(x);
        return true;
    }
    std::span<const std::byte> data_;
    std::size_t pos_ = 0;
};

bool valid_reply(const reply& r) noexcept {
    if (r.request_id == 0) return false;
    switch (r.status) {
        case reply_status::ok:
            return r.total_fds >= 1 && r.part_count == part_count_for(r.total_fds) &&
                   r.part_index < r.part_count && r.part_fds == part_fds_for(r.total_fds, r.part_index);
        case reply_status::not_available:
        case reply_status::busy:
        case reply_status::server_error:
            return r.total_fds == 0 && r.part_fds == 0 && r.part_index == 0 && r.part_count == 1;
    }
    return false;
}

}  // namespace

first_frame_kind classify_first_frame(std::span<const std::byte> payload) noexcept {
    if (!payload.empty() && payload[0] == std::byte{0x80}) return first_frame_kind::cpython_pickle;
    if (payload.size() >= 1 + magic.size() && payload[0] == static_cast<std::byte>(msg_type::hello) &&
        std::equal(magic.begin(), magic.end(), payload.begin() + 1))
        return first_frame_kind::native_hello;
    return first_frame_kind::unknown;
}

std::uint32_t part_count_for(std::uint32_t total_fds) noexcept {
    if (total_fds == 0) return 1;
    return (total_fds - 1) / max_fds_per_part + 1;
}

std::uint16_t part_fds_for(std::uint32_t total_fds, std::uint32_t index) noexcept {
    const std::uint64_t start = std::uint64_t{index} * max_fds_per_part;
    if (start >= total_fds) return 0;
    return static_cast<std::uint16_t>(std::min<std::uint64_t>(max_fds_per_part, total_fds - start));
}

std::vector<reply> split_reply(std::uint64_t request_id, std::uint32_t total_fds) {
    if (total_fds == 0) throw std::invalid_argument("a successful reply carries at least one descriptor");
    const std::uint32_t count = part_count_for(total_fds);
    std::vector<reply> parts;
    parts.reserve(count);
    for (std::uint32_t i = 0; i < count; ++i)
        parts.push_back({request_id, reply_status::ok, part_fds_for(total_fds, i), total_fds, i, count});
    return parts;
}

reply failure_reply(std::uint64_t request_id, reply_status status) noexcept {
    return {request_id, status, 0, 0, 0, 1};
}

std::vector<std::byte> encode(const message& m) {
    struct visitor {
        std::vector<std::byte> operator()(const hello& h) const {
            writer w(msg_type::hello);
            w.bytes(magic);
            w.u16(h.min_version);
            w.u16(h.max_version);
            w.u32(h.flags);
            return w.take();
        }
        std::vector<std::byte> operator()(const hello_ack& h) const {
            writer w(msg_type::hello_ack);
            w.bytes(magic);
            w.u16(h.version);
            w.u32(h.max_in_flight);
            w.u32(h.max_payload);
            return w.take();
        }
        std::vector<std::byte> operator()(const fetch& f) const {
            writer w(msg_type::fetch);
            w.u64(f.request_id);
            w.u64(f.key.high);
            w.u64(f.key.low);
            return w.take();
        }
        std::vector<std::byte> operator()(const reply& r) const {
            writer w(msg_type::reply);
            w.u64(r.request_id);
            w.u8(static_cast<std::uint8_t>(r.status));
            w.u16(r.part_fds);
            w.u32(r.total_fds);
            w.u32(r.part_index);
            w.u32(r.part_count);
            return w.take();
        }
        std::vector<std::byte> operator()(const confirm& c) const {
            if (c.ids.size() > max_confirm_ids) throw std::length_error("CONFIRM lists too many ids");
            writer w(msg_type::confirm);
            w.u64(c.up_to);
            w.u32(static_cast<std::uint32_t>(c.ids.size()));
            for (std::uint64_t id : c.ids) w.u64(id);
            return w.take();
        }
        std::vector<std::byte> operator()(const give_back& g) const {
            writer w(msg_type::give_back);
            w.u64(g.request_id);
            w.u8(static_cast<std::uint8_t>(g.reason));
            return w.take();
        }
        std::vector<std::byte> operator()(const error& e) const {
            if (e.text.size() > max_error_text) throw std::length_error("ERROR text longer than 256 bytes");
            writer w(msg_type::error);
            w.u16(static_cast<std::uint16_t>(e.code));
            w.u16(static_cast<std::uint16_t>(e.text.size()));
            w.bytes(std::as_bytes(std::span<const char>(e.text.data(), e.text.size())));
            return w.take();
        }
    };
    return std::visit(visitor{}, m);
}

void append_frame(std::vector<std::byte>& out, const message& m) {
    framing::append_frame(out, encode(m));
}

message decode(std::span<const std::byte> payload, std::error_code& ec, const char** why) noexcept {
    ec.clear();
    auto fail = [&](const char* reason) -> message {
        ec = errc::malformed_message;
        if (why) *why = reason;
        return hello{};
    };
    if (payload.size() > max_payload) return fail("native: payload above the limit");
    reader r(payload);
    std::uint8_t type = 0;
    if (!r.u8(type)) return fail("native: empty payload");
    auto check_magic = [&] {
        std::span<const std::byte> m;
        return r.bytes(magic.size(), m) && std::equal(m.begin(), m.end(), magic.begin());
    };
    try {
        switch (static_cast<msg_type>(type)) {
            case msg_type::hello: {
                hello h;
                if (!check_magic()) return fail("native: HELLO without the magic");
                if (!r.u16(h.min_version) || !r.u16(h.max_version) || !r.u32(h.flags) || !r.at_end())
                    return fail("native: HELLO has the wrong size");
                if (h.min_version == 0 || h.min_version > h.max_version)
                    return fail("native: HELLO version range");
                return h;
            }
            case msg_type::hello_ack: {
                hello_ack h;
                if (!check_magic()) return fail("native: HELLO_ACK without the magic");
                if (!r.u16(h.version) || !r.u32(h.max_in_flight) || !r.u32(h.max_payload) || !r.at_end())
                    return fail("native: HELLO_ACK has the wrong size");
                if (h.version == 0 || h.max_in_flight == 0) return fail("native: HELLO_ACK values");
                return h;
            }
            case msg_type::fetch: {
                fetch f;
                if (!r.u64(f.request_id) || !r.u64(f.key.high) || !r.u64(f.key.low) || !r.at_end())
                    return fail("native: FETCH has the wrong size");
                if (f.request_id == 0) return fail("native: request id 0");
                return f;
            }
            case msg_type::reply: {
                reply p;
                std::uint8_t status = 0;
                if (!r.u64(p.request_id) || !r.u8(status) || !r.u16(p.part_fds) || !r.u32(p.total_fds) ||
                    !r.u32(p.part_index) || !r.u32(p.part_count) || !r.at_end())
                    return fail("native: REPLY has the wrong size");
                p.status = static_cast<reply_status>(status);
                if (!valid_reply(p)) return fail("native: REPLY fields are inconsistent");
                return p;
            }
            case msg_type::confirm: {
                confirm c;
                std::uint32_t n = 0;
                if (!r.u64(c.up_to) || !r.u32(n)) return fail("native: CONFIRM truncated");
                if (n > max_confirm_ids || r.remaining() != std::size_t{n} * 8)
                    return fail("native: CONFIRM count does not match its size");
                c.ids.resize(n);
                for (auto& id : c.ids) {
                    if (!r.u64(id) || id == 0) return fail("native: CONFIRM id 0");
                }
                return c;
            }
            case msg_type::give_back: {
                give_back g;
                std::uint8_t reason = 0;
                if (!r.u64(g.request_id) || !r.u8(reason) || !r.at_end())
                    return fail("native: GIVE_BACK has the wrong size");
                if (g.request_id == 0 || reason > static_cast<std::uint8_t>(give_back_reason::other))
                    return fail("native: GIVE_BACK values");
                g.reason = static_cast<give_back_reason>(reason);
                return g;
            }
            case msg_type::error: {
                error e;
                std::uint16_t code = 0, len = 0;
                std::span<const std::byte> text;
                if (!r.u16(code) || !r.u16(len)) return fail("native: ERROR truncated");
                if (len > max_error_text || !r.bytes(len, text) || !r.at_end())
                    return fail("native: ERROR length does not match its size");
                e.code = static_cast<error_code_value>(code);
                e.text.assign(reinterpret_cast<const char*>(text.data()), text.size());
                return e;
            }
        }
    } catch (const std::bad_alloc&) {
        ec = std::make_error_code(std::errc::not_enough_memory);
        return hello{};
    }
    return fail("native: unknown message type");
}

}  // namespace steward::detail::native
