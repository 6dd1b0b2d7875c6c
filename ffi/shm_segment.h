// POSIX shared-memory segments owned by this uid: what every user of them in
// the library (the `shm` transport's inboxes, the software NIC's queues) does
// the same way. A creator makes the file O_EXCL, mode 0600 whatever the umask;
// whoever maps someone else's segment first checks its owner and mode, so a
// file another local user planted under the name is refused (see the
// "Segments" section of shm_transport.cc for why that is enough).
#ifndef EAAS_FFI_SHM_SEGMENT_H_
#define EAAS_FFI_SHM_SEGMENT_H_

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <string>

namespace eaas {

inline std::string ErrnoText(int err) { return std::string(std::strerror(err)); }

// Judges a segment file (`st`: fstat of the open file) before it is mapped:
// a regular file, owned by our effective uid, mode 0600 (its size is judged
// with its header). Returns "" or why not (naming the segment, its owner and mode).
inline std::string CheckSegmentFile(const struct stat& st, const std::string& name) {
  char mode[8];
  std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
  const std::string what = name + " (owner uid " + std::to_string(st.st_uid) + ", mode " + mode + ")";
  if (!S_ISREG(st.st_mode)) return "refusing shared-memory segment " + what + ": not a regular file";
  if (st.st_uid != geteuid()) {
    return "refusing shared-memory segment " + what + ": owned by another user (ours is uid " +
           std::to_string(geteuid()) + ")";
  }
  if ((st.st_mode & 07777) != 0600) return "refusing shared-memory segment " + what + ": mode is not 0600";
  return "";
}

// Gives the segment file `fd` that was just created as `name` (shm_open with
// O_CREAT | O_EXCL) mode 0600 (fchmod: the umask does not matter) and `total`
// bytes (zeros), and maps it read-write into *base. Closes `fd`; on failure
// unlinks `name` and returns why (`what` names the segment's role), else "".
inline std::string SizeAndMapSegment(int fd, const std::string& name, const std::string& what,
                                     std::size_t total, void** base) {
  if (fchmod(fd, 0600) != 0 || ftruncate(fd, static_cast<off_t>(total)) != 0) {
    const int err = errno;
    close(fd);
    shm_unlink(name.c_str());
    return "cannot size shared-memory " + what + " " + name + " to " + std::to_string(total) +
           " bytes: " + ErrnoText(err);
  }
  void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name.c_str());
    return "cannot map shared-memory " + what + " " + name + ": " + ErrnoText(err);
  }
  *base = p;
  return "";
}

}  // namespace eaas

#endif  // EAAS_FFI_SHM_SEGMENT_H_
