import MigrationEngine
import XCTest

/// The VM-network options of both agents (`--vm-bridge`, `--vm-mac`, `--vm-address`, `--tunnel-port`):
/// what is accepted, and that each mistake gets an error that names it.
final class TunnelOptionsTests: XCTestCase {
    func testMACAddressesParseAndPrint() throws {
        let mac = try XCTUnwrap(MACAddress(parsing: "52:54:00:AB:cd:0f"))
        XCTAssertEqual(mac.rawValue, 0x5254_00ab_cd0f)
        XCTAssertEqual("\(mac)", "52:54:00:ab:cd:0f")
        XCTAssertEqual(MACAddress(parsing: "52-54-00-ab-cd-0f"), mac)
        XCTAssertFalse(mac.isGroup)
        XCTAssertTrue(MACAddress.broadcast.isGroup)
        XCTAssertTrue(try XCTUnwrap(MACAddress(parsing: "33:33:ff:00:00:01")).isGroup)
        for bad in ["", "52:54:00:ab:cd", "52:54:00:ab:cd:0f:11", "52:54:00:ab:cd:0g", "525:4:00:ab:cd:0f", "52:54:00:ab:cd:"] {
            XCTAssertNil(MACAddress(parsing: bad), bad)
        }
        XCTAssertNil(MACAddress(rawValue: 1 << 48))
    }

    func testOptionsAreCheckedAndNamed() throws {
        XCTAssertNil(try TunnelOptions.parse(bridge: nil, mac: nil, addresses: [], port: nil))
        let options = try XCTUnwrap(TunnelOptions.parse(bridge: "br0", mac: "52:54:00:00:00:01", addresses: ["10.0.0.5", "192.168.1.255"], port: "fy0"))
        XCTAssertEqual(options.bridge, "br0")
        XCTAssertEqual(options.vmMAC?.rawValue, 0x5254_0000_0001)
        XCTAssertEqual(options.addresses, [0x0a00_0005, 0xc0a8_01ff])
        XCTAssertEqual(options.port, "fy0")
        XCTAssertEqual(try XCTUnwrap(TunnelOptions.parse(bridge: "br0", mac: nil, addresses: [], port: nil)).port, "ferry%d")

        func refused(_ bridge: String?, _ mac: String?, _ addresses: [String], _ port: String?, naming needle: String) {
            XCTAssertThrowsError(try TunnelOptions.parse(bridge: bridge, mac: mac, addresses: addresses, port: port)) { error in
                XCTAssertTrue("\(error)".contains(needle), "\(error)")
            }
        }
        refused(nil, "52:54:00:00:00:01", [], nil, naming: "need --vm-bridge")
        refused(nil, nil, ["10.0.0.1"], nil, naming: "need --vm-bridge")
        refused("br0", "ff:ff:ff:ff:ff:ff", [], nil, naming: "not a unicast MAC")
        refused("br0", "01:00:5e:00:00:01", [], nil, naming: "not a unicast MAC")
        refused("br0", "00:00:00:00:00:00", [], nil, naming: "not a unicast MAC")
        refused("br0", "nonsense", [], nil, naming: "--vm-mac nonsense")
        refused("br0", nil, ["10.0.0"], nil, naming: "--vm-address 10.0.0 is not")
        refused("br0", nil, ["10.0.0.256"], nil, naming: "--vm-address 10.0.0.256")
        refused("br0", nil, [], "a-name-far-too-long", naming: "1 to 15 characters")
        refused("br0", nil, [], "a/b", naming: "--tunnel-port")
    }
}
