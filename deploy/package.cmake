# Installation and the Debian packages (CPack DEB), included by the
# top-level CMakeLists.txt. Build them with:
#   cmake -S . -B build -DCMAKE_INSTALL_PREFIX=/usr && ninja -C build
#   cpack --config build/CPackConfig.cmake -B build/packages
# Two packages:
#   cairn                cairnd, cairn, cairn-certs, the systemd unit, an
#                        example configuration and the docs; a system user
#                        and group `cairn` (postinst)
#   python3-cairn-cinder the Cinder volume driver (cairn_cinder) for
#                        cinder-volume hosts
include(GNUInstallDirs)

install(TARGETS cairnd cairn RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT cairn)
install(PROGRAMS deploy/cairn-certs DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT cairn)
install(FILES deploy/systemd/cairnd@.service DESTINATION lib/systemd/system COMPONENT cairn)
install(FILES deploy/cairnd.conf.example DESTINATION ${CMAKE_INSTALL_DOCDIR}/examples
        COMPONENT cairn)
install(FILES README.md docs/OPERATIONS.md docs/SECURITY.md docs/FORMAT.md docs/CINDER.md
        DESTINATION ${CMAKE_INSTALL_DOCDIR} COMPONENT cairn)
install(DIRECTORY cinder_driver_shim/cairn_cinder DESTINATION lib/python3/dist-packages
        COMPONENT cinder FILES_MATCHING PATTERN "*.py")

# Every build from a git checkout has its own, increasing version
# (0.1.0+git<commits>.<hash>): apt on a node upgrades to a newer build and
# `dpkg -l cairn` names the commit. A new commit reconfigures (.git/logs/HEAD).
set(CAIRN_PACKAGE_VERSION ${PROJECT_VERSION})
find_package(Git QUIET)
if(GIT_FOUND AND EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/.git/logs/HEAD")
  execute_process(COMMAND ${GIT_EXECUTABLE} rev-list --count HEAD
                  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR} OUTPUT_VARIABLE commits
                  RESULT_VARIABLE commits_rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  execute_process(COMMAND ${GIT_EXECUTABLE} rev-parse --short=10 HEAD
                  WORKING_DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR} OUTPUT_VARIABLE hash
                  RESULT_VARIABLE hash_rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(commits_rc EQUAL 0 AND hash_rc EQUAL 0)
    set(CAIRN_PACKAGE_VERSION "${PROJECT_VERSION}+git${commits}.${hash}")
  endif()
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
               "${CMAKE_CURRENT_SOURCE_DIR}/.git/logs/HEAD")
endif()

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_VERSION ${CAIRN_PACKAGE_VERSION})
set(CPACK_PACKAGE_NAME cairn)
set(CPACK_PACKAGE_VENDOR "Cairn")
set(CPACK_PACKAGE_CONTACT "Cairn maintainers <cairn@localhost>")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL cairn cinder)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_COMPRESSION_TYPE xz)

set(CPACK_DEBIAN_CAIRN_PACKAGE_NAME cairn)
set(CPACK_DEBIAN_CAIRN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_CAIRN_PACKAGE_DEPENDS "adduser, openssl")
set(CPACK_DEBIAN_CAIRN_PACKAGE_RECOMMENDS "ceph-common")
# The first line of each description is its synopsis (no package-wide
# summary: CPack would put it before both).
set(CPACK_DEBIAN_CAIRN_DESCRIPTION
    "cross-site replication of Ceph RBD volumes\ncairnd streams changed-block journals of RBD images to a standby site,\nchecks every block with XXH3 and keeps verified restore points there;\ncairn is its operator's command line.")
set(CPACK_DEBIAN_CAIRN_PACKAGE_CONTROL_EXTRA
    "${CMAKE_CURRENT_SOURCE_DIR}/deploy/debian/postinst;${CMAKE_CURRENT_SOURCE_DIR}/deploy/debian/prerm;${CMAKE_CURRENT_SOURCE_DIR}/deploy/debian/postrm")
set(CPACK_DEBIAN_CAIRN_PACKAGE_CONTROL_STRICT_PERMISSION ON)

set(CPACK_DEBIAN_CINDER_PACKAGE_NAME python3-cairn-cinder)
set(CPACK_DEBIAN_CINDER_PACKAGE_ARCHITECTURE all)
set(CPACK_DEBIAN_CINDER_PACKAGE_DEPENDS "python3, python3-protobuf, python3-xxhash")
set(CPACK_DEBIAN_CINDER_PACKAGE_RECOMMENDS "cinder-volume")
set(CPACK_DEBIAN_CINDER_PACKAGE_SECTION python)
set(CPACK_DEBIAN_CINDER_DESCRIPTION
    "Cinder volume driver for Cairn\nReplicates the volumes of a Ceph RBD backend to another site with Cairn\n(cairn_cinder.driver.CairnRBDDriver).")
include(CPack)
