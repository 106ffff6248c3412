#pragma once
// Changes to a registry, recorded in order and applied in bulk. Recording is a sequential append
// into one buffer; applying a change touches the registry's table, entry and arena pages. After
// every system call those pages are cold again (caches and TLB), so a client that writes one message
// per call and records its change in the same call pays for them on every message. Recorded, the
// changes of a thousand messages are applied back to back, with the pages warm.
//
// Insert then erase of one name is an erase; erase then insert an insert: applying the records in
// order gives the same set as applying each change at once. For the same reason a change of the
// name the last record names replaces that record: a register/unregister pair costs one record, and
// applying it (an erase from a set without the name) costs next to nothing.

#include "tracker/registry.hpp"

#include <steward/resource_type.hpp>

#include <array>
#include <cstddef>
#include <cstring>
#include <string_view>

namespace steward::detail::tracking {

class registry_change_log {
public:
    /// Bytes of records held before they are applied; a record is 3 bytes plus the name.
    static constexpr std::size_t capacity = 16384;
    /// Records insert (or erase) of (type, name), applying the recorded changes first when there is
    /// no room. Throws what registry::insert() throws while applying; the records not yet applied
    /// stay recorded, and this change is not recorded.
    void record(registry& set, bool insert, resource_type type, std::string_view name) {
        const char tag = static_cast<char>((static_cast<unsigned>(type) << 1) | (insert ? 1u : 0u));
        if (last_ != no_record && same_key(bytes_.data() + last_, tag, name)) {
            bytes_[last_] = tag;
            return;
        }
        const std::size_t size = header_size + name.size();
        if (used_ + size > capacity) apply(set);
        if (size > capacity) {  // longer than any message line: apply it at once
            apply_one(set, insert, type, name);
            return;
        }
        char* p = bytes_.data() + used_;
        p[0] = tag;
        p[1] = static_cast<char>(name.size() & 0xff);
        p[2] = static_cast<char>(name.size() >> 8);
        std::memcpy(p + header_size, name.data(), name.size());
        last_ = used_;
        used_ += size;
    }

    /// Applies every recorded change to @p set, in order, and forgets them. When the registry
    /// throws, the changes from the one that failed on stay recorded.
    void apply(registry& set);

    /// Forgets the recorded changes without applying them.
    void clear() noexcept {
        used_ = 0;
        applied_ = 0;
        last_ = no_record;
    }

    [[nodiscard]] bool empty() const noexcept { return used_ == applied_; }

private:
    static constexpr std::size_t header_size = 3;  // (type << 1) | insert, name size (2 bytes)
    static constexpr std::size_t no_record = ~std::size_t{0};

    // Whether the record at @p p names (the type in @p tag, @p name). Its own insert bit is ignored.
    static bool same_key(const char* p, char tag, std::string_view name) noexcept {
        const std::size_t size =
            static_cast<unsigned char>(p[1]) | (std::size_t{static_cast<unsigned char>(p[2])} << 8);
        return ((p[0] ^ tag) & ~1) == 0 && size == name.size() &&
               std::memcmp(p + header_size, name.data(), size) == 0;
    }

    static void apply_one(registry& set, bool insert, resource_type type, std::string_view name);

    std::size_t used_ = 0;
    std::size_t applied_ = 0;       // records before this offset are in the registry
    std::size_t last_ = no_record;  // offset of the last record, not applied yet
    std::array<char, capacity> bytes_;
};

}  // namespace steward::detail::tracking
